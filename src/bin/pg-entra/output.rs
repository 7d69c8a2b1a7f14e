//! Text for people: marks, colour only on a terminal (and never with `NO_COLOR`).

use std::io::IsTerminal as _;

/// How to decorate text written to stdout.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Style {
    colour: bool,
}

impl Style {
    /// Colour when stdout is a terminal, `NO_COLOR` is unset and `TERM` is not `dumb`.
    pub(crate) fn for_stdout() -> Self {
        let colour = std::io::stdout().is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
            && std::env::var("TERM").map_or(true, |term| term != "dumb");
        Self { colour }
    }

    fn paint(self, code: &str, text: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    /// The mark of a step that passed.
    pub(crate) fn passed(self) -> String {
        self.paint("32", "✓")
    }

    /// The mark of a step that failed.
    pub(crate) fn failed(self) -> String {
        self.paint("31", "✗")
    }

    /// Less important text (where a value came from).
    pub(crate) fn dim(self, text: &str) -> String {
        self.paint("2", text)
    }

    /// A step's title.
    pub(crate) fn bold(self, text: &str) -> String {
        self.paint("1", text)
    }

    /// A warning's mark.
    pub(crate) fn warning(self) -> String {
        self.paint("33", "!")
    }
}
