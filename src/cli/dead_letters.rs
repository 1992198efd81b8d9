//! Dead letters as a tool: `edgefn dead-letters list|show|replay|purge`.
//!
//! The command works on the gateway's database with a connection of its
//! own, so it is safe while the daemon runs. `replay` only marks dead
//! letters (`dead_letters.replay`); the running daemon
//! ([`edgefn::ingest::replay`]) looks for marked ones every second, hands
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
use std::path::{Path, PathBuf};

use edgefn::clock::now_ms;
use edgefn::config::UPSTREAM;
use edgefn::ingest::replay::POLL;
use edgefn::store::{Inspector, Selection, StoredDeadLetter};
use edgefn::text::{Printable, printable};

/// `edgefn dead-letters`'s arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The gateway's configuration file.
    #[arg(
        long,
        short,
        global = true,
        env = "EDGEFN_CONFIG",
        default_value = "/etc/edgefn/edgefn.toml"
    )]
    config: PathBuf,
    /// What to do.
    #[command(subcommand)]
    action: Subcommand,
}

/// Carries out the subcommand on the gateway's database and prints what
/// it did.
pub fn command(args: Args) -> anyhow::Result<std::process::ExitCode> {
    let config = edgefn::config::Config::load(&args.config)?;
    let functions: Vec<String> = config.functions.iter().map(|f| f.name.clone()).collect();
    print!(
        "{}",
        run(&config.gateway.data_dir, &functions, args.action.action()?)?
    );
    Ok(std::process::ExitCode::SUCCESS)
}

/// `edgefn dead-letters` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Subcommand {
    /// One line per dead letter, oldest first.
    List {
        /// Only this function's.
        #[arg(long)]
        function: Option<String>,
    },
    /// One dead letter in full, payload included.
    Show {
        /// Its id (from `list`).
        id: i64,
    },
    /// Run dead letters again, through the current version of their
    /// function, in the running daemon: deleted if they run, kept with
    /// their attempts counted up if they fail again.
    Replay {
        /// These ids.
        ids: Vec<i64>,
        /// Every dead letter of this function.
        #[arg(long)]
        function: Option<String>,
        /// Every dead letter.
        #[arg(long, conflicts_with_all = ["ids", "function"])]
        all: bool,
    },
    /// Delete dead letters.
    Purge {
        /// These ids.
        ids: Vec<i64>,
        /// Only this function's.
        #[arg(long)]
        function: Option<String>,
        /// Only those stored longer ago than this, e.g. 7d.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<std::time::Duration>,
        /// Every dead letter.
        #[arg(long, conflicts_with_all = ["ids", "function", "older_than"])]
        all: bool,
    },
}

impl Subcommand {
    fn action(self) -> anyhow::Result<Action> {
        let now_ms = edgefn::clock::now_ms();
        Ok(match self {
            Subcommand::List { function } => Action::List { function },
            Subcommand::Show { id } => Action::Show { id },
            Subcommand::Replay { ids, function, all } => {
                if ids.is_empty() && function.is_none() && !all {
                    anyhow::bail!("say which dead letters: IDs, --function NAME or --all");
                }
                Action::Replay(Selection {
                    ids,
                    function,
                    before_ms: None,
                })
            }
            Subcommand::Purge {
                ids,
                function,
                older_than,
                all,
            } => {
                if ids.is_empty() && function.is_none() && older_than.is_none() && !all {
                    anyhow::bail!(
                        "say which dead letters: IDs, --function NAME, --older-than AGE or --all"
                    );
                }
                Action::Purge(Selection {
                    ids,
                    function,
                    before_ms: older_than.map(|d| now_ms.saturating_sub(d.as_millis() as u64)),
                })
            }
        })
    }
}

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
        crate::cli::invoke::show_payload(&d.letter.payload),
        d.letter.payload.len()
    );
    out
}
