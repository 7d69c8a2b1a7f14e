//! psql's command line as psql 15 reads it (`parse_psql_options` in `src/bin/psql/startup.c`,
//! through GNU `getopt_long`): which arguments say where to connect, and which are psql's own.
//!
//! `pg-entra psql` decides where psql connects, so it must read these exactly as psql does:
//! options in any order (GNU permutes them), clusters (`-qtAc SQL`), values attached or
//! separate (`-Ualice`, `-U alice`, `--username=alice`), unique prefixes of long options
//! (`--user` is `--username`), `--` ending the options, and the positional `DBNAME` and
//! `USERNAME` (the first positional is the user name when `-d` was given). Anything it cannot
//! read exactly (an unknown or ambiguous option) is refused rather than guessed.

use std::ffi::OsString;

/// Where psql was told to connect. `None`: not given on the command line.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ConnectionArgs {
    /// `-d` / `--dbname` or the first positional: a database name, or a whole connection
    /// string or URL (libpq expands it).
    pub(crate) dbname: Option<String>,
    /// `-h` / `--host`.
    pub(crate) host: Option<String>,
    /// `-p` / `--port`.
    pub(crate) port: Option<String>,
    /// `-U` / `--username`, or the positional after the database.
    pub(crate) username: Option<String>,
}

/// psql's arguments, split.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct PsqlArgs {
    /// Where to connect.
    pub(crate) connection: ConnectionArgs,
    /// Every other option, with its value, in order: passed to psql unchanged.
    pub(crate) own: Vec<OsString>,
}

/// Whether an option takes a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Value {
    None,
    Required,
    /// Only as `--name=value` (`--help=commands`).
    Optional,
}

/// psql 15's options: the short letter (if any), the long name (if any), and its value.
const OPTIONS: [(Option<char>, Option<&str>, Value); 36] = [
    (Some('a'), Some("echo-all"), Value::None),
    (Some('A'), Some("no-align"), Value::None),
    (Some('b'), Some("echo-errors"), Value::None),
    (Some('c'), Some("command"), Value::Required),
    (Some('d'), Some("dbname"), Value::Required),
    (Some('e'), Some("echo-queries"), Value::None),
    (Some('E'), Some("echo-hidden"), Value::None),
    (Some('f'), Some("file"), Value::Required),
    (Some('F'), Some("field-separator"), Value::Required),
    (Some('z'), Some("field-separator-zero"), Value::None),
    (Some('h'), Some("host"), Value::Required),
    (Some('H'), Some("html"), Value::None),
    (Some('l'), Some("list"), Value::None),
    (Some('L'), Some("log-file"), Value::Required),
    (Some('n'), Some("no-readline"), Value::None),
    (Some('1'), Some("single-transaction"), Value::None),
    (Some('o'), Some("output"), Value::Required),
    (Some('p'), Some("port"), Value::Required),
    (Some('P'), Some("pset"), Value::Required),
    (Some('q'), Some("quiet"), Value::None),
    (Some('R'), Some("record-separator"), Value::Required),
    (Some('0'), Some("record-separator-zero"), Value::None),
    (Some('s'), Some("single-step"), Value::None),
    (Some('S'), Some("single-line"), Value::None),
    (Some('t'), Some("tuples-only"), Value::None),
    (Some('T'), Some("table-attr"), Value::Required),
    (Some('U'), Some("username"), Value::Required),
    (Some('v'), Some("set"), Value::Required),
    (Some('v'), Some("variable"), Value::Required),
    (Some('V'), Some("version"), Value::None),
    (Some('w'), Some("no-password"), Value::None),
    (Some('W'), Some("password"), Value::None),
    (Some('x'), Some("expanded"), Value::None),
    (Some('X'), Some("no-psqlrc"), Value::None),
    (Some('?'), Some("help"), Value::Optional),
    (None, Some("csv"), Value::None),
];

/// Why psql's arguments could not be read exactly.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Unreadable(pub(crate) String);

impl PsqlArgs {
    /// Reads psql's arguments as psql does.
    pub(crate) fn parse(args: &[OsString]) -> Result<Self, Unreadable> {
        let mut parsed = PsqlArgs::default();
        let mut positionals: Vec<String> = Vec::new();
        let mut index = 0;
        while index < args.len() {
            let arg = text(&args[index])?;
            index += 1;
            if arg == "--" {
                for rest in &args[index..] {
                    positionals.push(text(rest)?.to_owned());
                }
                break;
            }
            if let Some(long) = arg.strip_prefix("--") {
                let (name, attached) = match long.split_once('=') {
                    Some((name, value)) => (name, Some(value.to_owned())),
                    None => (long, None),
                };
                let (short, full, kind) = long_option(name)?;
                let value = match (kind, attached) {
                    (Value::None, Some(_)) => {
                        return Err(Unreadable(format!("--{full} takes no value")));
                    }
                    (Value::None, None) => None,
                    (Value::Optional, attached) => attached,
                    (Value::Required, Some(value)) => Some(value),
                    (Value::Required, None) => {
                        let value = args
                            .get(index)
                            .ok_or_else(|| Unreadable(format!("--{full} needs a value")))?;
                        index += 1;
                        Some(text(value)?.to_owned())
                    }
                };
                parsed.take(short, Some(full), value);
            } else if arg.len() > 1 && arg.starts_with('-') {
                // A cluster of short options; the first that takes a value ends it.
                let letters: Vec<char> = arg[1..].chars().collect();
                let mut at = 0;
                while at < letters.len() {
                    let letter = letters[at];
                    at += 1;
                    let kind = short_option(letter)?;
                    if kind == Value::Required {
                        let rest: String = letters[at..].iter().collect();
                        let value = if rest.is_empty() {
                            let value = args
                                .get(index)
                                .ok_or_else(|| Unreadable(format!("-{letter} needs a value")))?;
                            index += 1;
                            text(value)?.to_owned()
                        } else {
                            rest
                        };
                        parsed.take(Some(letter), None, Some(value));
                        break;
                    }
                    parsed.take(Some(letter), None, None);
                }
            } else {
                // GNU getopt permutes: a positional anywhere is still a positional.
                positionals.push(arg.to_owned());
            }
        }
        // As psql: the first positional is the database unless -d gave one; then the user.
        for positional in positionals {
            if parsed.connection.dbname.is_none() {
                parsed.connection.dbname = Some(positional);
            } else if parsed.connection.username.is_none() {
                parsed.connection.username = Some(positional);
            } else {
                return Err(Unreadable(format!(
                    "{positional:?} is a third positional argument (psql takes DBNAME and USERNAME)"
                )));
            }
        }
        Ok(parsed)
    }

    /// Records one option: a connection option in `connection` (the last one given wins, as
    /// in psql), any other in `own`.
    fn take(&mut self, short: Option<char>, long: Option<&str>, value: Option<String>) {
        let connection = &mut self.connection;
        let slot = match short {
            Some('d') => Some(&mut connection.dbname),
            Some('h') => Some(&mut connection.host),
            Some('p') => Some(&mut connection.port),
            Some('U') => Some(&mut connection.username),
            _ => None,
        };
        match slot {
            Some(slot) => *slot = value,
            None => {
                // Passed on in one argument, so that psql reads exactly this.
                let mut option = match (short, long) {
                    (_, Some(long)) => OsString::from(format!("--{long}")),
                    (Some(short), None) => OsString::from(format!("-{short}")),
                    (None, None) => return,
                };
                if let Some(value) = value {
                    if long.is_some() {
                        option.push("=");
                        option.push(value);
                        self.own.push(option);
                    } else {
                        self.own.push(option);
                        self.own.push(value.into());
                    }
                } else {
                    self.own.push(option);
                }
            }
        }
    }
}

fn text(arg: &OsString) -> Result<&str, Unreadable> {
    arg.to_str()
        .ok_or_else(|| Unreadable(format!("{arg:?} is not valid UTF-8")))
}

fn short_option(letter: char) -> Result<Value, Unreadable> {
    OPTIONS
        .iter()
        .find(|(short, _, _)| *short == Some(letter))
        .map(|(_, _, value)| *value)
        .ok_or_else(|| Unreadable(format!("-{letter} is not a psql option")))
}

/// A long option by its name or a unique prefix of it, as `getopt_long` matches.
fn long_option(name: &str) -> Result<(Option<char>, &'static str, Value), Unreadable> {
    let names = || {
        OPTIONS
            .iter()
            .filter_map(|(s, l, v)| l.map(|l| (*s, l, *v)))
    };
    if let Some(exact) = names().find(|(_, long, _)| *long == name) {
        return Ok(exact);
    }
    let matches: Vec<_> = names()
        .filter(|(_, long, _)| long.starts_with(name))
        .collect();
    match matches.as_slice() {
        [one] => Ok(*one),
        // getopt_long accepts a prefix shared by several spellings of one option.
        [first, rest @ ..]
            if !name.is_empty()
                && rest
                    .iter()
                    .all(|(short, _, value)| *short == first.0 && *value == first.2) =>
        {
            Ok(*first)
        }
        [] => Err(Unreadable(format!("--{name} is not a psql option"))),
        _ => Err(Unreadable(format!(
            "--{name} is ambiguous ({})",
            matches
                .iter()
                .map(|(_, long, _)| format!("--{long}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<PsqlArgs, Unreadable> {
        PsqlArgs::parse(&args.iter().map(OsString::from).collect::<Vec<_>>())
    }

    fn connection(args: &[&str]) -> ConnectionArgs {
        parse(args).unwrap().connection
    }

    #[test]
    fn every_way_to_say_where_to_connect() {
        let expected = ConnectionArgs {
            dbname: Some("db".into()),
            host: Some("h".into()),
            port: Some("6432".into()),
            username: Some("alice".into()),
        };
        for args in [
            &["-d", "db", "-h", "h", "-p", "6432", "-U", "alice"][..],
            &["-ddb", "-hh", "-p6432", "-Ualice"],
            &["--dbname=db", "--host=h", "--port=6432", "--username=alice"],
            &[
                "--dbname",
                "db",
                "--host",
                "h",
                "--port",
                "6432",
                "--username",
                "alice",
            ],
            &["--db=db", "--ho=h", "--po=6432", "--user=alice"],
            &["-h", "h", "-p", "6432", "db", "alice"],
            &["db", "-h", "h", "alice", "-p", "6432"],
            &["-d", "db", "-h", "h", "-p", "6432", "alice"],
            &["-qtAh", "h", "-p", "6432", "-U", "alice", "db"],
            &["-h", "h", "-p", "6432", "--", "db", "alice"],
        ] {
            assert_eq!(connection(args), expected, "{args:?}");
        }
    }

    #[test]
    fn values_that_look_like_options_are_values() {
        let parsed = parse(&["-c", "-h", "-v", "x=1", "--set=y=2", "db"]).unwrap();
        assert_eq!(parsed.connection.dbname.as_deref(), Some("db"));
        assert_eq!(parsed.connection.host, None);
        assert_eq!(parsed.own, ["-c", "-h", "-v", "x=1", "--set=y=2"]);
        let parsed = parse(&["-qtAcselect 1"]).unwrap();
        assert_eq!(parsed.own, ["-q", "-t", "-A", "-c", "select 1"]);
        assert_eq!(parsed.connection, ConnectionArgs::default());
    }

    #[test]
    fn the_last_option_wins_and_conninfo_is_a_dbname() {
        let parsed = connection(&["-h", "a", "-h", "b", "host=c sslmode=require"]);
        assert_eq!(parsed.host.as_deref(), Some("b"));
        assert_eq!(parsed.dbname.as_deref(), Some("host=c sslmode=require"));
    }

    #[test]
    fn what_cannot_be_read_exactly_is_refused() {
        for args in [
            &["--hostaddr=1.2.3.4"][..],
            &["-Z"],
            &["--s=x"],
            &["--list=x"],
            &["-h"],
            &["a", "b", "c"],
            &["--single"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
        assert!(parse(&["--help=commands"]).is_ok());
        assert!(parse(&["--var", "a=1"]).is_ok());
    }
}
