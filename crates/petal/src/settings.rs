//! A run's settings as flags: one mechanism for the config file
//! (`--config petal.toml`, its keys the long flag names), the run folder's
//! `config.json` (every setting the run was made with), and `--resume`
//! (the recorded settings come back; only `--rounds` and operational flags
//! may change, and a data set, model or strategy change is refused before
//! anything starts).
//!
//! Settings travel as command-line arguments: a config file's keys and a
//! resumed run's recorded settings are put before the user's own flags,
//! and clap, overriding earlier occurrences with later ones, lets the
//! command line win.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use anyhow::{Context, bail};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};
use serde::{Deserialize, Serialize};

/// The settings of this process's run (set once the command line is parsed).
pub static RECORDED: std::sync::OnceLock<RecordedSettings> = std::sync::OnceLock::new();

/// File name of a run's settings.
pub const CONFIG_JSON: &str = "config.json";

/// Flags a resumed run may change: where and how it runs, not what it
/// computes.
const OPERATIONAL: &[&str] = &[
    "rounds",
    "out",
    "resume",
    "config",
    "address",
    "call-timeout",
    "wait-timeout",
    "max-skipped-rounds",
    "max-in-flight",
    "in-flight-memory-mb",
    "max-message-mb",
    "max-metrics",
    "max-tensors",
    "max-streams-per-connection",
    "max-connections-per-ip",
    "handshake-timeout",
    "worker-timeout",
    "isolation",
    "max-concurrent-fit",
    "clients-per-process",
    "threads",
    "device",
    "data-dir",
    "download",
    "python",
    "log-format",
    "no-progress",
    "ssl-certfile",
    "ssl-keyfile",
    "ssl-ca-certfile",
    "insecure",
    "auth-keys",
    "keepalive-interval",
    "keepalive-timeout",
    "workers",
    "recycle-after",
];

/// Flags that are not settings of the computation at all.
const NOT_RECORDED: &[&str] = &[
    "help",
    "version",
    "config",
    "resume",
    "out",
    "learner-config",
];

/// The subcommands that make a run folder.
const RUNS: &[&str] = &["server", "run", "simulate"];

/// What `config.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecordedSettings {
    /// The Petal version that made the run.
    pub petal: String,
    /// `server` or `run`.
    pub command: String,
    /// Every setting, flag name → values (as they would be typed).
    pub settings: BTreeMap<String, Vec<String>>,
}

/// The subcommand's name and matches.
fn sub(matches: &ArgMatches) -> Option<(&str, &ArgMatches)> {
    matches.subcommand()
}

/// The long names of the flags of `cmd`'s subcommand `name`, with their action.
fn flags(cmd: &Command, name: &str) -> BTreeMap<String, (String, ArgAction)> {
    cmd.find_subcommand(name)
        .map(|s| {
            s.get_arguments()
                .filter_map(|a| {
                    a.get_long().map(|l| {
                        (
                            l.to_string(),
                            (a.get_id().to_string(), a.get_action().clone()),
                        )
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `--key value` arguments for a setting (a switch when `action` is one).
fn as_args(key: &str, values: &[String], action: &ArgAction) -> Vec<OsString> {
    match action {
        ArgAction::SetTrue => {
            if values.iter().any(|v| v == "true") {
                vec![format!("--{key}").into()]
            } else {
                Vec::new()
            }
        }
        ArgAction::SetFalse => {
            if values.iter().any(|v| v == "false") {
                vec![format!("--{key}").into()]
            } else {
                Vec::new()
            }
        }
        _ => values
            .iter()
            .flat_map(|v| [OsString::from(format!("--{key}")), OsString::from(v)])
            .collect(),
    }
}

/// The position in `argv` right after the subcommand's name.
fn after_subcommand(argv: &[OsString], name: &str) -> usize {
    argv.iter()
        .position(|a| a == name)
        .map_or(argv.len(), |i| i + 1)
}

/// A TOML value as the strings of a flag.
fn toml_values(key: &str, v: &toml::Value) -> anyhow::Result<Vec<String>> {
    Ok(match v {
        toml::Value::String(s) => vec![s.clone()],
        toml::Value::Integer(i) => vec![i.to_string()],
        toml::Value::Float(f) => vec![f.to_string()],
        toml::Value::Boolean(b) => vec![b.to_string()],
        toml::Value::Array(a) => a
            .iter()
            .map(|x| toml_values(key, x).map(|mut v| v.remove(0)))
            .collect::<anyhow::Result<_>>()?,
        other => bail!(
            "key '{key}': {} is not a flag's value (a string, number, boolean or list)",
            other.type_str()
        ),
    })
}

/// `argv` with the settings of `--config FILE` (if given) put right after
/// the subcommand, so that flags on the command line win. Unknown keys and
/// values that are not a flag's are errors naming the key.
pub fn expand_config_file(cmd: &Command, argv: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let Some(at) = argv
        .iter()
        .position(|a| a == "--config" || a.to_string_lossy().starts_with("--config="))
    else {
        return Ok(argv);
    };
    let path: OsString = match argv[at].to_string_lossy().strip_prefix("--config=") {
        Some(p) => p.into(),
        None => argv.get(at + 1).cloned().context("--config needs a file")?,
    };
    let path = Path::new(&path);
    let Some(name) = argv
        .iter()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .find(|a| cmd.find_subcommand(a).is_some())
    else {
        return Ok(argv);
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not TOML", path.display()))?;
    let known = flags(cmd, &name);
    let mut injected = Vec::new();
    for (key, value) in &table {
        let Some((_, action)) = known.get(key) else {
            bail!(
                "{}: unknown key '{key}': the keys are `petal {name}`'s long flag names",
                path.display()
            );
        };
        if key == "config" {
            bail!("{}: a config file cannot name another", path.display());
        }
        let values = toml_values(key, value).with_context(|| format!("{}", path.display()))?;
        injected.extend(as_args(key, &values, action));
    }
    let pos = after_subcommand(&argv, &name);
    let mut out = argv[..pos].to_vec();
    out.extend(injected);
    out.extend_from_slice(&argv[pos..]);
    Ok(out)
}

/// Every setting of the parsed subcommand (flags with values, defaults
/// included) but the operational ones.
pub fn record(cmd: &Command, matches: &ArgMatches) -> Option<RecordedSettings> {
    let (name, m) = sub(matches)?;
    if !RUNS.contains(&name) {
        return None;
    }
    let mut settings = BTreeMap::new();
    for (long, (id, _)) in flags(cmd, name) {
        if NOT_RECORDED.contains(&long.as_str()) || OPERATIONAL.contains(&long.as_str()) {
            continue;
        }
        let Ok(Some(raw)) = m.try_get_raw(&id) else {
            continue;
        };
        let values: Vec<String> = raw.map(|v| v.to_string_lossy().into_owned()).collect();
        settings.insert(long, values);
    }
    Some(RecordedSettings {
        petal: env!("CARGO_PKG_VERSION").to_string(),
        command: name.to_string(),
        settings,
    })
}

/// Flags the user gave (on the command line or in a config file).
fn explicit(cmd: &Command, name: &str, m: &ArgMatches) -> BTreeMap<String, Vec<String>> {
    flags(cmd, name)
        .into_iter()
        .filter(|(_, (id, _))| m.value_source(id) == Some(ValueSource::CommandLine))
        .filter_map(|(long, (id, _))| {
            let raw = m.try_get_raw(&id).ok().flatten()?;
            Some((
                long,
                raw.map(|v| v.to_string_lossy().into_owned()).collect(),
            ))
        })
        .collect()
}

/// For `server|run --resume DIR`: refuses a setting given now that differs
/// from the run's (`config.json`), then returns `argv` with the run's
/// settings put before the user's flags. Other commands: `argv` as is.
pub fn resume_args(
    cmd: &Command,
    matches: &ArgMatches,
    argv: Vec<OsString>,
) -> anyhow::Result<Vec<OsString>> {
    let Some((name, m)) = sub(matches) else {
        return Ok(argv);
    };
    if !RUNS.contains(&name) {
        return Ok(argv);
    }
    let Ok(Some(dir)) = m.try_get_one::<std::path::PathBuf>("resume") else {
        return Ok(argv);
    };
    let path = dir.join(CONFIG_JSON);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(
                "{} has no {CONFIG_JSON} (made by an older Petal): its settings cannot be \
                 checked; the flags given now are used",
                dir.display()
            );
            return Ok(argv);
        }
        Err(e) => return Err(e).with_context(|| path.display().to_string()),
    };
    let recorded: RecordedSettings = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a Petal run's settings", path.display()))?;
    if recorded.command != name {
        bail!(
            "{} was made by `petal {}`; resume it with `petal {} --resume {}`",
            dir.display(),
            recorded.command,
            recorded.command,
            dir.display()
        );
    }
    let given = explicit(cmd, name, m);
    for (key, now) in &given {
        if OPERATIONAL.contains(&key.as_str()) || NOT_RECORDED.contains(&key.as_str()) {
            continue;
        }
        match recorded.settings.get(key) {
            Some(then) if then != now => bail!(
                "--{key} {} differs from the run's {} ({}): a resumed run keeps its data set, \
                 model, strategy and training settings; only --rounds and operational flags may \
                 change",
                now.join(" "),
                then.join(" "),
                path.display()
            ),
            _ => {}
        }
    }
    let known = flags(cmd, name);
    let mut injected = Vec::new();
    // Runs made by an earlier Petal recorded --server-eval-every's default without
    // --server-eval; the flag now turns server-side evaluation on.
    let old_default_every =
        recorded.settings.get("server-eval").map(Vec::as_slice) == Some(&["false".to_string()][..]);
    for (key, values) in &recorded.settings {
        if given.contains_key(key) || (key == "server-eval-every" && old_default_every) {
            continue;
        }
        if let Some((_, action)) = known.get(key) {
            injected.extend(as_args(key, values, action));
        }
    }
    let pos = after_subcommand(&argv, name);
    let mut out = argv[..pos].to_vec();
    out.extend(injected);
    out.extend_from_slice(&argv[pos..]);
    Ok(out)
}
