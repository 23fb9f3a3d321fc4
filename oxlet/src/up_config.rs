//! `oxlet up --config FILE`: a YAML or TOML file whose keys are the long flags of `oxlet up`
//! (`cluster-cidr: 10.244.0.0/16`, `no-dns: true`, `cni-bin-dir: [/opt/cni/bin]`), as k3s reads
//! its config.yaml. The file's settings go in front of the command line's flags, so a flag
//! given on the command line wins.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: unknown key {key:?} (the keys are the long flags of `oxlet up`)")]
    UnknownKey { path: PathBuf, key: String },
    #[error("config file {path}: key {key:?}: {message}")]
    Value {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// Reads `path` (TOML when it ends in `.toml`, YAML otherwise, which takes JSON too) into the
/// flags it stands for, checked against `up`, the `oxlet up` command. Keys in `skip` are left
/// out (a global flag the command line already sets).
pub fn flags(path: &Path, up: &clap::Command, skip: &[&str]) -> Result<Vec<OsString>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    let parse_err = |message: String| ConfigError::Parse {
        path: path.into(),
        message,
    };
    let doc: Value = if path.extension().is_some_and(|e| e == "toml") {
        toml::from_str(&text).map_err(|e| parse_err(e.to_string()))?
    } else if text.trim().is_empty() {
        Value::Object(Default::default())
    } else {
        serde_yaml::from_str(&text).map_err(|e| parse_err(e.to_string()))?
    };
    let Value::Object(map) = doc else {
        return Err(parse_err(
            "expected a mapping of flag names to values".into(),
        ));
    };
    let mut out = Vec::new();
    for (key, value) in map {
        if skip.contains(&key.as_str()) {
            continue;
        }
        let value_err = |message: &str| ConfigError::Value {
            path: path.into(),
            key: key.clone(),
            message: message.into(),
        };
        let arg = up
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && key != "config" && key != "help")
            .ok_or_else(|| ConfigError::UnknownKey {
                path: path.into(),
                key: key.clone(),
            })?;
        let flag = format!("--{key}");
        if !arg.get_action().takes_values() {
            match value {
                Value::Bool(true) => out.push(flag.into()),
                Value::Bool(false) | Value::Null => {}
                _ => return Err(value_err("expected true or false")),
            }
            continue;
        }
        // A flag whose value is optional (`merge-kubeconfig: true`) stands alone.
        let value_optional = arg.get_num_args().is_some_and(|r| r.min_values() == 0);
        match value {
            Value::Bool(true) if value_optional => {
                out.push(flag.into());
                continue;
            }
            Value::Bool(false) | Value::Null if value_optional => continue,
            _ => {}
        }
        let scalar = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        let text = match &value {
            Value::Array(items) => items
                .iter()
                .map(scalar)
                .collect::<Option<Vec<_>>>()
                .map(|v| v.join(","))
                .ok_or_else(|| value_err("expected a list of strings or numbers"))?,
            v => scalar(v).ok_or_else(|| value_err("expected a string or a number"))?,
        };
        out.push(format!("{flag}={text}").into());
    }
    Ok(out)
}

/// The command line with the flags of `oxlet up --config FILE` put right after `up`, ahead of
/// the command line's own. Other commands' arguments are returned as they are.
pub fn expand(args: Vec<OsString>, cli: &clap::Command) -> Result<Vec<OsString>, ConfigError> {
    // The subcommand is the first argument that is not the global --data-dir or its value.
    let mut up_at = None;
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if a == "--data-dir" {
            i += 2;
            continue;
        }
        if !a.starts_with('-') {
            if a == "up" {
                up_at = Some(i);
            }
            break;
        }
        i += 1;
    }
    let Some(up_at) = up_at else {
        return Ok(args);
    };
    let mut file = None;
    for (j, a) in args.iter().enumerate().skip(up_at + 1) {
        let a = a.to_string_lossy();
        if a == "--config" {
            file = args.get(j + 1).map(PathBuf::from);
        } else if let Some(f) = a.strip_prefix("--config=") {
            file = Some(PathBuf::from(f));
        }
    }
    let Some(file) = file else {
        return Ok(args);
    };
    let up = cli.find_subcommand("up").expect("oxlet has an up command");
    // data-dir is global: the command line or OXLET_DATA_DIR wins over the file.
    let data_dir_given = std::env::var_os("OXLET_DATA_DIR").is_some()
        || args.iter().any(|a| {
            let a = a.to_string_lossy();
            a == "--data-dir" || a.starts_with("--data-dir=")
        });
    let skip: &[&str] = if data_dir_given { &["data-dir"] } else { &[] };
    let mut up = up.clone();
    if !data_dir_given {
        up = up.arg(clap::Arg::new("data-dir").long("data-dir"));
    }
    let flags = flags(&file, &up, skip)?;
    let mut out = args[..=up_at].to_vec();
    out.extend(flags);
    out.extend_from_slice(&args[up_at + 1..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> clap::Command {
        clap::Command::new("oxlet")
            .arg(clap::Arg::new("data-dir").long("data-dir").global(true))
            .subcommand(
                clap::Command::new("up")
                    .arg(clap::Arg::new("config").long("config"))
                    .arg(clap::Arg::new("port").long("port"))
                    .arg(clap::Arg::new("cni-bin-dir").long("cni-bin-dir"))
                    .arg(
                        clap::Arg::new("merge-kubeconfig")
                            .long("merge-kubeconfig")
                            .num_args(0..=1),
                    )
                    .arg(
                        clap::Arg::new("no-dns")
                            .long("no-dns")
                            .action(clap::ArgAction::SetTrue),
                    ),
            )
    }

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn with_file(name: &str, text: &str, f: impl FnOnce(&Path)) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        f(&p)
    }

    #[test]
    fn yaml_keys_become_flags_ahead_of_the_command_line() {
        with_file(
            "c.yaml",
            "port: 7443\nno-dns: true\ncni-bin-dir: [/a, /b]\n",
            |p| {
                let got = expand(
                    args(&[
                        "oxlet",
                        "up",
                        "--config",
                        p.to_str().unwrap(),
                        "--port",
                        "1",
                    ]),
                    &cli(),
                )
                .unwrap();
                let want = args(&[
                    "oxlet",
                    "up",
                    "--cni-bin-dir=/a,/b",
                    "--no-dns",
                    "--port=7443",
                    "--config",
                    p.to_str().unwrap(),
                    "--port",
                    "1",
                ]);
                assert_eq!(got, want);
            },
        );
    }

    #[test]
    fn toml_reads_the_same_keys() {
        with_file(
            "c.toml",
            "port = 7443\nno-dns = false\nmerge-kubeconfig = true\n",
            |p| {
                let got = expand(
                    args(&["oxlet", "up", &format!("--config={}", p.display())]),
                    &cli(),
                )
                .unwrap();
                assert_eq!(
                    got[2..4],
                    [
                        OsString::from("--merge-kubeconfig"),
                        OsString::from("--port=7443")
                    ]
                );
                assert_eq!(got.len(), 5, "{got:?}");
            },
        );
    }

    #[test]
    fn data_dir_from_the_file_unless_the_command_line_sets_it() {
        with_file("c.yaml", "data-dir: /srv/oxlet\n", |p| {
            let c = p.to_str().unwrap();
            let got = expand(args(&["oxlet", "up", "--config", c]), &cli()).unwrap();
            assert_eq!(got[2], OsString::from("--data-dir=/srv/oxlet"));
            let got = expand(
                args(&["oxlet", "--data-dir", "/d", "up", "--config", c]),
                &cli(),
            )
            .unwrap();
            assert_eq!(
                got,
                args(&["oxlet", "--data-dir", "/d", "up", "--config", c])
            );
        });
    }

    #[test]
    fn unknown_keys_and_wrong_values_are_named() {
        with_file("c.yaml", "prot: 1\n", |p| {
            let e = expand(
                args(&["oxlet", "up", "--config", p.to_str().unwrap()]),
                &cli(),
            )
            .unwrap_err();
            assert!(e.to_string().contains("unknown key \"prot\""), "{e}");
        });
        with_file("c.yaml", "no-dns: yes please\n", |p| {
            let e = expand(
                args(&["oxlet", "up", "--config", p.to_str().unwrap()]),
                &cli(),
            )
            .unwrap_err();
            assert!(e.to_string().contains("expected true or false"), "{e}");
        });
        let e = expand(
            args(&["oxlet", "up", "--config", "/nonexistent/oxlet.yaml"]),
            &cli(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/oxlet.yaml"), "{e}");
    }

    #[test]
    fn other_commands_are_left_alone() {
        let a = args(&["oxlet", "agent", "--config", "x"]);
        assert_eq!(expand(a.clone(), &cli()).unwrap(), a);
    }
}
