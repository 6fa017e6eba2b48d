//! The plain `teamtune` commands that the composite commands (`demo`, `improve`) run in this
//! process, parsed from the same words their reports print, so a report's commands are
//! exactly what ran.

use clap::Parser;

use crate::commands;

/// The plain commands a composite command may run.
#[derive(Parser)]
#[command(name = "teamtune", no_binary_name = false)]
enum Plain {
    Collect(commands::collect::Args),
    Eval(commands::eval::Args),
    Train(commands::train::Args),
    Plot(commands::plot::Args),
    Compare(commands::compare::Args),
    Replay(commands::replay::Args),
}

/// Runs `teamtune WORDS...` in this process.
pub fn run_plain(words: &[String]) -> anyhow::Result<()> {
    let parsed =
        Plain::try_parse_from(std::iter::once("teamtune".to_owned()).chain(words.iter().cloned()))
            .map_err(|e| anyhow::anyhow!("internal command `{}`: {e}", shell_line(words)))?;
    match parsed {
        Plain::Collect(a) => commands::collect::run(a),
        Plain::Eval(a) => commands::eval::run(a),
        Plain::Train(a) => commands::train::run(a),
        Plain::Plot(a) => commands::plot::run(a),
        Plain::Compare(a) => commands::compare::run(a),
        Plain::Replay(a) => commands::replay::run(a),
    }
}

/// `teamtune` followed by the words, quoted for a POSIX shell where needed.
pub fn shell_line(words: &[String]) -> String {
    let mut s = String::from("teamtune");
    for w in words {
        s.push(' ');
        let plain = !w.is_empty()
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./,:=+@".contains(c));
        if plain {
            s += w;
        } else {
            s += &format!("'{}'", w.replace('\'', "'\\''"));
        }
    }
    s
}

/// The words as owned strings.
pub fn words(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}
