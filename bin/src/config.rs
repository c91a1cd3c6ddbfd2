//! `--config FILE`: every setting of `rustci dev`, `server` and `agent` in
//! one TOML file, checked in full before anything starts.
//!
//! The keys are the subcommand's own long flags (`listen`, `data-dir`,
//! `join-token-file`, ...; `data_dir` is accepted too), read off the clap
//! definition of the command, so a flag added later is a key at once with
//! nothing to write here. Keys may sit at the top of the file, for the
//! subcommand being started, or in a table named after a subcommand
//! (`[server]`, `[agent]`, `[dev]`), which overrides the top for that
//! subcommand only. The other subcommands' tables are checked too, so a typo
//! in a shared file is found by whichever process reads it first.
//!
//! Precedence: the command line, then the environment (`RUSTCI_JOIN_TOKEN`
//! and the like), then the file, then the defaults. A repeatable flag given
//! on the command line replaces the file's list; it does not extend it.
//!
//! An unknown key, a value of the wrong TOML type, or a value the flag itself
//! would refuse (a port out of range, a number past its range) stops the
//! process with one line naming the file, the line and column, and the key.
//! The file's values reach the program by the same road as flags (they are
//! parsed by the flags' own parsers), so a setting means the same thing in
//! both places.

use std::any::TypeId;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command, CommandFactory as _, FromArgMatches as _};
use toml::de::{DeString, DeTable, DeValue};
use toml::Spanned;

use crate::cli::Cli;

/// The subcommands that take `--config`.
pub const SUBCOMMANDS: [&str; 3] = ["dev", "server", "agent"];
/// The flag (and arg id) naming the file.
pub const CONFIG_FLAG: &str = "config";
/// A config file larger than this is refused unread (it is a few settings).
const FILE_BYTES_MAX: u64 = 1024 * 1024;
/// How far (in edits) a mistyped key may be from a known one to be suggested.
const SUGGESTION_EDITS_MAX: usize = 3;

/// Why the command line could not be turned into a [`Cli`].
#[derive(Debug)]
pub enum ParseError {
    /// The command line itself (clap's own error, rendered by the caller).
    Usage(clap::Error),
    /// The config file: one line that names the file and the key.
    Config(String),
}

/// Parses `args` (the program name first) like `Cli::try_parse_from`, with
/// the settings of `--config FILE` filled in where neither the command line
/// nor the environment gave them.
pub fn parse(args: Vec<OsString>) -> Result<Cli, ParseError> {
    let command = env_overridden(Cli::command(), &args);
    let matches = command
        .clone()
        .try_get_matches_from(&args)
        .map_err(ParseError::Usage)?;
    let Some((name, given)) = matches.subcommand() else {
        return from_matches(&matches);
    };
    let path = match given.try_get_one::<PathBuf>(CONFIG_FLAG) {
        Ok(Some(path)) => path.clone(),
        _ => return from_matches(&matches),
    };
    let sub = command.find_subcommand(name).expect("clap matched it");
    let settings = read(&path, &command, name).map_err(ParseError::Config)?;
    let extra = settings_as_args(&settings, sub, given, &path).map_err(ParseError::Config)?;
    // The file's settings go right after the subcommand's name, before the
    // command line's own arguments (which never repeat one of them).
    let at = args
        .iter()
        .skip(1)
        .position(|a| a == name)
        .map_or(args.len(), |i| i + 2);
    let mut full = args[..at].to_vec();
    full.extend(extra);
    full.extend_from_slice(&args[at..]);
    let matches = command.try_get_matches_from(full).map_err(|e| {
        ParseError::Config(format!(
            "config file {}: {}",
            path.display(),
            crate::cli::one_line_usage_error(&e, None)
        ))
    })?;
    from_matches(&matches)
}

/// `command`, without the environment variable of each flag that a flag
/// on the command line excludes: the command line wins over the
/// environment across such a pair too (`--join-token-file` given,
/// `RUSTCI_JOIN_TOKEN` set), instead of the two clashing.
fn env_overridden(command: Command, args: &[OsString]) -> Command {
    let Some(name) = args.get(1).and_then(|a| a.to_str()) else {
        return command;
    };
    let Some(sub) = command.find_subcommand(name) else {
        return command;
    };
    let given = |arg: &Arg| {
        arg.get_long().is_some_and(|long| {
            let flag = format!("--{long}");
            args.iter().filter_map(|a| a.to_str()).any(|a| {
                a == flag
                    || a.strip_prefix(flag.as_str())
                        .is_some_and(|v| v.starts_with('='))
            })
        })
    };
    let overridden: Vec<clap::Id> = sub
        .get_arguments()
        .filter(|a| {
            a.get_env()
                .is_some_and(|var| std::env::var_os(var).is_some())
        })
        .filter(|a| {
            sub.get_arguments().any(|b| {
                let excludes = sub
                    .get_arg_conflicts_with(a)
                    .iter()
                    .any(|c| c.get_id() == b.get_id())
                    || sub
                        .get_arg_conflicts_with(b)
                        .iter()
                        .any(|c| c.get_id() == a.get_id());
                excludes && given(b)
            })
        })
        .map(|a| a.get_id().clone())
        .collect();
    if overridden.is_empty() {
        return command;
    }
    command.mut_subcommand(name, |mut sub| {
        for id in &overridden {
            sub = sub.mut_arg(id, |a| a.env(None::<&'static str>));
        }
        sub
    })
}

fn from_matches(matches: &ArgMatches) -> Result<Cli, ParseError> {
    Cli::from_arg_matches(matches).map_err(ParseError::Usage)
}

/// One key of the file, checked, as the flag arguments it stands for.
struct Setting<'c> {
    arg: &'c Arg,
    /// The key as written.
    key: String,
    /// `file:line:column` of the key.
    place: String,
    /// `--flag=value` for each value, `--flag` for a true switch, nothing
    /// for a false one.
    args: Vec<OsString>,
}

/// The file's text and name, for locating what is wrong in it.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    /// `file:line:column` of byte `offset`.
    fn place(&self, offset: usize) -> String {
        let (line, column) = crate::cli::line_and_column(self.text, offset);
        format!("{}:{line}:{column}", self.path.display())
    }
}

/// Reads and checks the whole file; returns the settings for `running`
/// (its table's keys over the top level's).
fn read<'c>(path: &Path, command: &'c Command, running: &str) -> Result<Vec<Setting<'c>>, String> {
    let cannot = |e: &dyn std::fmt::Display| {
        format!(
            "--config {}: cannot read the config file: {e}",
            path.display()
        )
    };
    let size = std::fs::metadata(path).map_err(|e| cannot(&e))?.len();
    if size > FILE_BYTES_MAX {
        return Err(cannot(&format!(
            "it is {size} bytes, more than the {FILE_BYTES_MAX} a config file may have"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| cannot(&e))?;
    let src = Source { path, text: &text };
    let doc = DeTable::parse(&text).map_err(|e| {
        let place = e
            .span()
            .map_or(path.display().to_string(), |s| src.place(s.start));
        let message = e.message().trim().replace('\n', " ");
        format!("config file {place}: invalid TOML: {message}")
    })?;
    let running_cmd = command.find_subcommand(running).expect("a subcommand");
    let mut top = Vec::new();
    let mut table = Vec::new();
    for (key, value) in doc.get_ref().iter() {
        let name = key.get_ref().as_ref();
        if let (DeValue::Table(t), true) = (value.get_ref(), SUBCOMMANDS.contains(&name)) {
            let cmd = command.find_subcommand(name).expect("a subcommand");
            let checked = table_settings(t, cmd, command, &src)?;
            if name == running {
                table = checked;
            }
            continue;
        }
        top.push(setting(key, value, running_cmd, command, &src)?);
    }
    top.retain(|s| !table.iter().any(|t| t.arg.get_id() == s.arg.get_id()));
    top.extend(table);
    Ok(top)
}

fn table_settings<'c>(
    table: &DeTable<'_>,
    cmd: &'c Command,
    root: &Command,
    src: &Source<'_>,
) -> Result<Vec<Setting<'c>>, String> {
    table
        .iter()
        .map(|(key, value)| setting(key, value, cmd, root, src))
        .collect()
}

/// The flags a config file may set: every long flag but these.
fn is_key(arg: &Arg) -> bool {
    arg.get_long()
        .is_some_and(|l| !matches!(l, CONFIG_FLAG | "help" | "version"))
}

fn setting<'c>(
    key: &Spanned<DeString<'_>>,
    value: &Spanned<DeValue<'_>>,
    cmd: &'c Command,
    root: &Command,
    src: &Source<'_>,
) -> Result<Setting<'c>, String> {
    let written = key.get_ref().to_string();
    let long = written.replace('_', "-");
    let place = src.place(key.span().start);
    let Some(arg) = cmd
        .get_arguments()
        .find(|a| is_key(a) && a.get_long() == Some(long.as_str()))
    else {
        return Err(format!(
            "config file {place}: unknown key `{written}` for `rustci {}`{}",
            cmd.get_name(),
            hint(&long, cmd, root)
        ));
    };
    let at = src.place(value.span().start);
    let problem = |what: String| format!("config file {at}: key `{written}`: {what}");
    let mut args = Vec::new();
    for v in values(arg, value.get_ref()).map_err(problem)? {
        check_value(arg, &v).map_err(|e| problem(format!("invalid value {v:?}: {e}")))?;
        args.push(OsString::from(format!("--{long}={v}")));
    }
    if !arg.get_action().takes_values() && matches!(value.get_ref(), DeValue::Boolean(true)) {
        args.push(OsString::from(format!("--{long}")));
    }
    Ok(Setting {
        arg,
        key: written,
        place,
        args,
    })
}

/// What a flag's values are, as TOML sees them.
#[derive(Clone, Copy)]
enum Kind {
    Switch,
    Integer,
    Number,
    Text,
}

impl Kind {
    fn of(arg: &Arg) -> Kind {
        if !arg.get_action().takes_values() {
            return Kind::Switch;
        }
        let t = arg.get_value_parser().type_id();
        let integers = [
            TypeId::of::<u8>(),
            TypeId::of::<u16>(),
            TypeId::of::<u32>(),
            TypeId::of::<u64>(),
            TypeId::of::<usize>(),
            TypeId::of::<i8>(),
            TypeId::of::<i16>(),
            TypeId::of::<i32>(),
            TypeId::of::<i64>(),
            TypeId::of::<isize>(),
        ];
        if integers.iter().any(|i| t == *i) {
            Kind::Integer
        } else if t == TypeId::of::<f64>() || t == TypeId::of::<f32>() {
            Kind::Number
        } else {
            Kind::Text
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Kind::Switch => "true or false",
            Kind::Integer => "an integer",
            Kind::Number => "a number",
            Kind::Text => "a string",
        }
    }
}

fn found(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// The values `value` gives the flag, as the command line would spell them;
/// or what was expected instead.
fn values(arg: &Arg, value: &DeValue<'_>) -> Result<Vec<String>, String> {
    let kind = Kind::of(arg);
    if let Kind::Switch = kind {
        return match value {
            DeValue::Boolean(_) => Ok(Vec::new()),
            other => Err(format!("expected true or false, found {}", found(other))),
        };
    }
    let repeatable = matches!(arg.get_action(), ArgAction::Append);
    match value {
        DeValue::Array(items) if repeatable => items
            .iter()
            .map(|item| scalar(kind, item.get_ref()))
            .collect::<Result<_, _>>()
            .map_err(|other| {
                format!(
                    "expected a list of {}s, found {other} in it",
                    kind.expected()
                        .trim_start_matches("an ")
                        .trim_start_matches("a ")
                )
            }),
        // `label = { pool = "a" }` for `--label pool=a`.
        DeValue::Table(table) if repeatable => table
            .iter()
            .map(|(k, v)| {
                scalar(Kind::Text, v.get_ref())
                    .or_else(|_| scalar(Kind::Number, v.get_ref()))
                    .map(|v| format!("{}={v}", k.get_ref()))
            })
            .collect::<Result<_, _>>()
            .map_err(|other| format!("expected a table of KEY = VALUE, found {other} in it")),
        other => scalar(kind, other).map(|v| vec![v]).map_err(|other| {
            let or_list = if repeatable {
                ", or a list of them"
            } else {
                ""
            };
            format!("expected {}{or_list}, found {other}", kind.expected())
        }),
    }
}

/// One value as the command line would spell it, or what it was instead.
fn scalar(kind: Kind, value: &DeValue<'_>) -> Result<String, &'static str> {
    match (kind, value) {
        (Kind::Text, DeValue::String(s)) => Ok(s.to_string()),
        (Kind::Integer | Kind::Number, DeValue::Integer(i)) => {
            i128::from_str_radix(i.as_str(), i.radix())
                .map(|n| n.to_string())
                .map_err(|_| "an integer out of range")
        }
        (Kind::Number, DeValue::Float(f)) => Ok(f.as_str().replace('_', "")),
        (_, other) => Err(found(other)),
    }
}

/// Runs `value` through the flag's own parser (ranges, addresses, choices).
fn check_value(arg: &Arg, value: &str) -> Result<(), String> {
    let probe = Arg::new("value")
        .long("value")
        .action(ArgAction::Set)
        .value_parser(arg.get_value_parser().clone());
    let mut cmd = Command::new("rustci").no_binary_name(true).arg(probe);
    match cmd.try_get_matches_from_mut([format!("--value={value}")]) {
        Ok(_) => Ok(()),
        Err(e) => Err(value_error(&e)),
    }
}

/// What a flag's parser said about a value, without clap's framing.
fn value_error(e: &clap::Error) -> String {
    use std::error::Error as _;
    if let Some(source) = e.source() {
        return source.to_string().replace('\n', " ");
    }
    if let Some(ContextValue::Strings(valid)) = e.get(ContextKind::ValidValue) {
        return format!("expected one of {}", valid.join(", "));
    }
    crate::cli::one_line_usage_error(e, None)
}

/// " (did you mean `x`?)", or where the key belongs, or nothing.
fn hint(long: &str, cmd: &Command, root: &Command) -> String {
    if long == CONFIG_FLAG {
        return " (a config file cannot name another)".into();
    }
    if let Some(owner) = SUBCOMMANDS.iter().find(|name| {
        root.find_subcommand(name).is_some_and(|c| {
            c.get_arguments()
                .any(|a| is_key(a) && a.get_long() == Some(long))
        })
    }) {
        return format!(" (it is a setting of `rustci {owner}`: put it in an [{owner}] table)");
    }
    cmd.get_arguments()
        .filter(|a| is_key(a))
        .filter_map(|a| a.get_long())
        .map(|known| (edit_distance(long, known), known))
        .filter(|(d, known)| *d <= SUGGESTION_EDITS_MAX.min(known.len() / 2 + 1))
        .min()
        .map_or(String::new(), |(_, known)| {
            format!(" (did you mean `{known}`?)")
        })
}

/// Levenshtein distance, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The file's settings as arguments, leaving out each one the command line
/// or the environment gave already (or gave a flag it conflicts with).
fn settings_as_args(
    settings: &[Setting<'_>],
    sub: &Command,
    given: &ArgMatches,
    path: &Path,
) -> Result<Vec<OsString>, String> {
    let conflict = |a: &Arg, b: &Arg| {
        sub.get_arg_conflicts_with(a)
            .iter()
            .chain(sub.get_arg_conflicts_with(b).iter())
            .any(|c| c.get_id() == a.get_id() || c.get_id() == b.get_id())
            && a.get_id() != b.get_id()
    };
    for (i, a) in settings.iter().enumerate() {
        if let Some(b) = settings[i + 1..].iter().find(|b| conflict(a.arg, b.arg)) {
            return Err(format!(
                "config file {}: keys `{}` ({}) and `{}` ({}) cannot both be set",
                path.display(),
                a.key,
                a.place,
                b.key,
                b.place
            ));
        }
    }
    let explicit = |arg: &Arg| {
        matches!(
            given.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    let mut out = Vec::new();
    for s in settings {
        let overridden = explicit(s.arg)
            || sub
                .get_arguments()
                .any(|o| conflict(s.arg, o) && explicit(o));
        if !overridden {
            out.extend(s.args.iter().cloned());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("listen", "listen"), 0);
        assert_eq!(edit_distance("listn", "listen"), 1);
        assert_eq!(edit_distance("data-dri", "data-dir"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn every_daemon_subcommand_takes_config() {
        let command = Cli::command();
        for name in SUBCOMMANDS {
            let sub = command.find_subcommand(name).unwrap();
            assert!(
                sub.get_arguments()
                    .any(|a| a.get_long() == Some(CONFIG_FLAG)),
                "rustci {name} has no --{CONFIG_FLAG}"
            );
        }
    }
}
