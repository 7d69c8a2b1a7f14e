//! `pg-entra doctor`: the path from configuration to a PostgreSQL session, one step at a time,
//! stopping at the first failure with what to do next.

mod login;
mod network;
mod role_sql;
mod steps;

use std::time::Duration;

use serde::Serialize;

use crate::exit::Failure;
use crate::output::Style;
use crate::server::ServerArgs;

/// Arguments of `pg-entra doctor`.
#[derive(Debug, clap::Args)]
pub(crate) struct DoctorArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The limit on each network step and on the login, in seconds (1 to 3600).
    #[arg(long, value_name = "SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
}

/// One step's findings.
#[derive(Debug, Serialize)]
pub(crate) struct Step {
    /// `configuration`, `credential`, ...
    step: &'static str,
    ok: bool,
    /// One line: what was found, or what went wrong.
    summary: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    details: Vec<Detail>,
    /// Things that did not stop the check but deserve a look.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
    /// SQL for a server administrator.
    #[serde(skip_serializing_if = "Option::is_none")]
    sql: Option<String>,
    /// Likely causes of a failure, most likely first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    causes: Vec<String>,
    /// What to do next.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    next: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Detail {
    label: String,
    value: String,
    /// Where a setting's value came from (`--host`, `PGHOST`, `default`).
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<String>,
}

impl Step {
    pub(crate) fn passed(step: &'static str, summary: impl Into<String>) -> Self {
        Self {
            step,
            ok: true,
            summary: summary.into(),
            details: Vec::new(),
            warnings: Vec::new(),
            sql: None,
            causes: Vec::new(),
            next: Vec::new(),
        }
    }

    pub(crate) fn failed(step: &'static str, summary: impl Into<String>) -> Self {
        Self {
            ok: false,
            ..Self::passed(step, summary)
        }
    }

    /// A failed step saying what the library said, and its hint as what to do next.
    pub(crate) fn failed_with(step: &'static str, error: &pg_entra::Error) -> Self {
        let failed = Self::failed(step, error.to_string());
        match error.hint() {
            Some(hint) => failed.next(hint),
            None => failed,
        }
    }

    pub(crate) fn detail(mut self, label: impl Into<String>, value: impl Into<String>) -> Self {
        self.details.push(Detail {
            label: label.into(),
            value: value.into(),
            source: None,
        });
        self
    }

    /// A setting's value and where it came from.
    pub(crate) fn setting(
        mut self,
        label: impl Into<String>,
        value: impl Into<String>,
        source: impl Into<String>,
    ) -> Self {
        self.details.push(Detail {
            label: label.into(),
            value: value.into(),
            source: Some(source.into()),
        });
        self
    }

    /// Puts these details before the ones already there (what was learnt before a failure).
    pub(crate) fn details_first(mut self, facts: &[(String, String)]) -> Self {
        let earlier = facts.iter().map(|(label, value)| Detail {
            label: label.clone(),
            value: value.clone(),
            source: None,
        });
        self.details.splice(0..0, earlier);
        self
    }

    pub(crate) fn warning(mut self, warning: impl Into<String>) -> Self {
        self.warnings.push(warning.into());
        self
    }

    pub(crate) fn sql(mut self, sql: String) -> Self {
        self.sql = Some(sql);
        self
    }

    pub(crate) fn cause(mut self, cause: impl Into<String>) -> Self {
        self.causes.push(cause.into());
        self
    }

    pub(crate) fn next(mut self, next: impl Into<String>) -> Self {
        self.next.push(next.into());
        self
    }

    fn render(&self, number: usize, style: Style) -> String {
        let mark = if self.ok {
            style.passed()
        } else {
            style.failed()
        };
        let mut text = format!(
            "{mark} {} {}\n",
            style.bold(&format!("{number}. {}:", self.step)),
            self.summary
        );
        let width = self
            .details
            .iter()
            .map(|d| d.label.chars().count())
            .max()
            .unwrap_or(0);
        for detail in &self.details {
            let pad = width - detail.label.chars().count();
            let source = detail
                .source
                .as_ref()
                .map(|source| style.dim(&format!("  from {source}")))
                .unwrap_or_default();
            text += &format!(
                "    {}{}  {}{source}\n",
                style.dim(&detail.label),
                " ".repeat(pad),
                detail.value
            );
        }
        for warning in &self.warnings {
            text += &format!("    {} {warning}\n", style.warning());
        }
        if let Some(sql) = &self.sql {
            for line in sql.lines() {
                text += &format!("      {line}\n");
            }
        }
        if !self.causes.is_empty() {
            text += "    likely causes, most likely first:\n";
            for (index, cause) in self.causes.iter().enumerate() {
                text += &format!("      {}. {cause}\n", index + 1);
            }
        }
        for next in &self.next {
            text += &format!("    → {next}\n");
        }
        text
    }
}

/// The steps taken so far, printed as they come (text) or all at the end (JSON).
pub(crate) struct Report {
    json: bool,
    style: Style,
    steps: Vec<Step>,
}

impl Report {
    /// Records a step (printed at once as text).
    pub(crate) fn add(&mut self, step: Step) {
        if !self.json {
            print!("{}", step.render(self.steps.len() + 1, self.style));
        }
        self.steps.push(step);
    }

    /// Records a step that passed, or one that failed and ends the check with `failure`.
    pub(crate) fn record(&mut self, step: Step, failure: Failure) -> Result<(), Failure> {
        let ok = step.ok;
        self.add(step);
        if ok { Ok(()) } else { Err(failure) }
    }

    /// Records a failed step; the check ends with `failure`.
    pub(crate) fn fail(&mut self, step: Step, failure: Failure) -> Failure {
        self.add(step);
        failure
    }

    fn finish(self, outcome: Result<String, Failure>) -> Result<(), Failure> {
        if self.json {
            let failure = outcome.as_ref().err().copied();
            let document = serde_json::json!({
                "ok": outcome.is_ok(),
                "failure": failure.map(Failure::name),
                "exit_code": failure.map_or(0, Failure::code),
                "steps": self.steps,
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&document).unwrap_or_default()
            );
        } else {
            match &outcome {
                Ok(success) => println!("\n{} {success}", self.style.passed()),
                Err(failure) => println!(
                    "\n{} stopped at step {} ({}); exit code {}",
                    self.style.failed(),
                    self.steps.len(),
                    failure.name(),
                    failure.code()
                ),
            }
        }
        outcome.map(drop)
    }
}

/// Runs the doctor; the exit code tells the failure class.
pub(crate) async fn run(args: DoctorArgs, json: bool) -> Result<(), Failure> {
    let mut report = Report {
        json,
        style: Style::for_stdout(),
        steps: Vec::new(),
    };
    let timeout = Duration::from_secs(args.timeout);
    let outcome = steps::examine(&args.server, timeout, &mut report).await;
    report.finish(outcome)
}
