//! Dead letters as a tool: `edgefn dead-letters list|show|replay|purge`.
//!
//! The command works on the gateway's database with a connection of its
//! own, so it is safe while the daemon runs. `replay` only marks dead
//! letters (`dead_letters.replay`); the running daemon
//! ([`crate::ingest::replay`]) looks for marked ones every second, hands
//! each to the current version
//! of its function (only that function, whatever else its topic
//! triggers), and commits the outcome like a device message's: in the same
//! transaction the dead letter is deleted (it ran) or kept with its
//! attempts counted up and its new error (it failed again). A dead letter
//! of a function that is not on the gateway any more stays as it was, and
//! the command says so before marking it. A record the upstream refused
//! (function `upstream`) is put back in the outbox. Marked dead letters
//! wait for the daemon if it is not running.

use std::fmt::Write as _;
use std::path::Path;

use crate::clock::now_ms;
use crate::config::UPSTREAM;
use crate::ingest::replay::POLL;
use crate::store::{Inspector, Selection, StoredDeadLetter};
use crate::text::{Printable, printable};

/// What `edgefn dead-letters` does.
#[derive(Debug, Clone)]
pub enum Action {
    /// Lists them (of one function).
    List {
        /// Only this function's.
        function: Option<String>,
    },
    /// Shows one in full.
    Show {
        /// Its id.
        id: i64,
    },
    /// Marks them for the daemon to run again.
    Replay(Selection),
    /// Deletes them.
    Purge(Selection),
}

/// Runs `action` on the database in `data_dir`; `functions` are the names
/// of the configuration's functions (the deployed ones are read from the
/// database). Returns what to print.
pub fn run(data_dir: &Path, functions: &[String], action: Action) -> anyhow::Result<String> {
    let mut store = Inspector::open(data_dir)?;
    match action {
        Action::List { function } => Ok(render_list(&store.list(function.as_deref())?)),
        Action::Show { id } => match store.get(id)? {
            Some(d) => Ok(render_one(&d)),
            None => anyhow::bail!("there is no dead letter {id}"),
        },
        Action::Replay(selection) => {
            let ids = selected(&store, &selection)?;
            let mut on_gateway: Vec<String> = functions.to_vec();
            on_gateway.extend(store.deployed_functions()?);
            on_gateway.push(UPSTREAM.to_owned());
            let mut missing = Vec::new();
            for id in &ids {
                if let Some(d) = store.get(*id)?
                    && !on_gateway.contains(&d.letter.function)
                {
                    missing.push(format!("{} ({})", id, d.letter.function));
                }
            }
            if !missing.is_empty() {
                anyhow::bail!(
                    "not replayed: the function of dead letter(s) {} is not on this gateway \
                     (removed?); nothing was changed, the dead letters stay",
                    missing.join(", ")
                );
            }
            let n = store.request_replay(&ids)?;
            Ok(format!(
                "{n} dead letter(s) marked for replay ({}); the running daemon runs each through \
                 the current version of its function within {}s: one that runs is deleted, one \
                 that fails again stays with its attempts counted up\n",
                list_ids(&ids),
                POLL.as_secs()
            ))
        }
        Action::Purge(selection) => {
            let ids = selected(&store, &selection)?;
            let n = store.purge(&ids)?;
            Ok(format!("{n} dead letter(s) deleted\n"))
        }
    }
}

/// The ids `selection` takes; an error if it names an id there is not, or
/// takes none.
fn selected(store: &Inspector, selection: &Selection) -> Result<Vec<i64>, anyhow::Error> {
    let ids = store.select(selection)?;
    let unknown: Vec<String> = selection
        .ids
        .iter()
        .filter(|id| !ids.contains(id))
        .map(|id| id.to_string())
        .collect();
    if !unknown.is_empty() {
        anyhow::bail!(
            "there is no dead letter {} (of the selection given); nothing was changed",
            unknown.join(", ")
        );
    }
    if ids.is_empty() {
        anyhow::bail!("no dead letter matches; nothing was changed");
    }
    Ok(ids)
}

fn list_ids(ids: &[i64]) -> String {
    let shown: Vec<String> = ids.iter().take(20).map(|i| i.to_string()).collect();
    if ids.len() > 20 {
        format!("ids {} and {} more", shown.join(", "), ids.len() - 20)
    } else {
        format!("ids {}", shown.join(", "))
    }
}

/// How long ago `ms` was, roughly ("3m", "2h", "5d").
fn age(ms: u64) -> String {
    let secs = now_ms().saturating_sub(ms) / 1000;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

fn version(d: &StoredDeadLetter) -> String {
    match d.letter.version {
        Some(0) => "config".into(),
        Some(v) => format!("v{v}"),
        None => "-".into(),
    }
}

/// `list` output: one line per dead letter.
pub fn render_list(all: &[StoredDeadLetter]) -> String {
    if all.is_empty() {
        return "no dead letters\n".into();
    }
    let mut out = format!(
        "{:>6}  {:<20} {:<15} {:<8} {:>8} {:>5}  {:<28} error\n",
        "id", "function", "version", "kind", "attempts", "age", "topic"
    );
    for d in all {
        let mut error = printable(&d.letter.error.replace('\n', " ")).into_owned();
        if error.len() > 60 {
            let cut = (0..=60)
                .rev()
                .find(|&i| error.is_char_boundary(i))
                .unwrap_or(0);
            error.truncate(cut);
            error.push('…');
        }
        let _ = writeln!(
            out,
            "{:>6}  {:<20} {:<15} {:<8} {:>8} {:>5}  {:<28} {}{}",
            d.id,
            d.letter.function,
            version(d),
            d.letter.kind,
            d.letter.attempts,
            age(d.created_ms),
            Printable(&d.letter.topic),
            if d.replay { "[replay pending] " } else { "" },
            error
        );
    }
    out
}

/// `show` output: every field, the payload as text (or hex).
pub fn render_one(d: &StoredDeadLetter) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "id        {}", d.id);
    let _ = writeln!(out, "function  {} ({})", d.letter.function, version(d));
    let _ = writeln!(out, "kind      {}", d.letter.kind);
    let _ = writeln!(out, "error     {}", Printable(&d.letter.error));
    let _ = writeln!(out, "attempts  {}", d.letter.attempts);
    let _ = writeln!(
        out,
        "stored    {} ago ({} ms since the epoch)",
        age(d.created_ms),
        d.created_ms
    );
    let _ = writeln!(out, "replay    {}", if d.replay { "pending" } else { "no" });
    let _ = writeln!(out, "topic     {}", Printable(&d.letter.topic));
    let _ = writeln!(
        out,
        "payload   {} ({} bytes)",
        crate::invoke::show_payload(&d.letter.payload),
        d.letter.payload.len()
    );
    out
}
