//! What the process owes its environment whatever happens to a run: files it made are removed on SIGINT, SIGTERM
//! and SIGHUP (exit status 128 + the signal, as a shell reports a death by that signal), a closed stdout ends the run
//! quietly, error chains print each cause once, and Mesa's complaint about an unset `XDG_RUNTIME_DIR` never reaches
//! the user.

use std::io;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

/// Prints a line to stdout; a failed write (a closed pipe: `strata generate ... | head -1`) is an error the caller
/// returns with `?`, so the run unwinds, its offload files are removed, and [`exit_status`] ends it quietly.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}
pub(crate) use outln;

/// Like [`outln!`] without the newline.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)?
    }};
}
pub(crate) use out;

/// A borderless text table (comfy-table): the columns in `right` (numbers) right-aligned, the others left-aligned,
/// columns two spaces apart, no trailing spaces; one line per row, each ending in a newline.
pub(crate) fn text_table(
    header: &[&str],
    right: &[usize],
    rows: impl IntoIterator<Item = Vec<String>>,
) -> String {
    use comfy_table::{presets::NOTHING, CellAlignment, Table};
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header(header.to_vec());
    for row in rows {
        table.add_row(row);
    }
    let last = header.len().saturating_sub(1);
    for (i, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, if i == last { 0 } else { 2 }));
        if right.contains(&i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    let mut text = table.trim_fmt();
    text.push('\n');
    text
}

/// The exit status of a run that stopped because its stdout was closed: what a shell reports for a death by SIGPIPE.
const BROKEN_PIPE_STATUS: u8 = 128 + 13;

/// Held while a result file is written: a signal waits for the write to finish, so an interrupted job never leaves
/// half a block (only SIGKILL can, and a resumed job repairs that).
static WRITING: Mutex<()> = Mutex::new(());

/// Runs `f` (a write that must not be cut short by SIGINT, SIGTERM or SIGHUP) with signals waiting.
pub fn uninterrupted<T>(f: impl FnOnce() -> T) -> T {
    let _held = WRITING.lock().unwrap_or_else(|p| p.into_inner());
    f()
}

/// The private runtime directory made for Mesa when `XDG_RUNTIME_DIR` was unset, removed at exit and on signals,
/// with its owner record, held locked while the process lives.
static RUNTIME_DIR: Mutex<Option<(PathBuf, std::fs::File)>> = Mutex::new(None);

/// The name prefix of private runtime directories in the temp directory.
const RUNTIME_DIR_PREFIX: &str = "strata-xdg-";
/// The owner record in a private runtime directory.
const RUNTIME_DIR_OWNER: &str = "owner.lock";

/// Removes everything this process wrote that must not outlive it: offload files and the directories strata made
/// for them, a packed checkpoint's `.part` being written, the private runtime directory. Safe to call more than once
/// and from any thread.
pub fn remove_run_files() {
    strata_runtime::tiers::cleanup_all();
    strata_runtime::checkpoint::remove_partial_files();
    let dir = RUNTIME_DIR.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some((dir, _owner)) = dir {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Ends the process at once. `std::process::exit` runs the C atexit handlers first (the Vulkan driver's teardown can
/// take a while), during which the main thread keeps running and may write new offload files after the cleanup; so a
/// second cleanup runs right before `_exit`, which skips them.
fn exit_now(code: i32) -> ! {
    #[cfg(unix)]
    {
        unsafe extern "C" {
            fn _exit(status: i32) -> !;
        }
        remove_run_files();
        // SAFETY: _exit takes any status and never returns; no Rust state is used afterwards.
        unsafe { _exit(code) }
    }
    #[cfg(not(unix))]
    std::process::exit(code)
}

/// On SIGINT, SIGTERM and SIGHUP (Ctrl-C, `timeout`, `docker stop`, a closed SSH session): remove this run's files
/// and exit with 128 + the signal. The signals are taken on a thread of their own (signal-hook), so the cleanup may
/// lock and allocate.
#[cfg(unix)]
pub fn handle_signals() -> io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGXFSZ};
    // A write past the file size limit (`ulimit -f`) would kill the process with SIGXFSZ and leave its files; with
    // a handler the write fails with EFBIG instead, an error the run reports and cleans up after.
    signal_hook::flag::register(SIGXFSZ, std::sync::Arc::default())?;
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::Builder::new()
        .name("strata-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                // A result write in progress finishes first; the lock is never released, so none starts.
                let _held = WRITING.lock().unwrap_or_else(|p| p.into_inner());
                remove_run_files();
                exit_now(128 + signal);
            }
        })?;
    Ok(())
}

/// Ctrl-C (and, with ctrlc's `termination` feature, closing the console) on platforms without Unix signals.
#[cfg(not(unix))]
pub fn handle_signals() -> io::Result<()> {
    ctrlc::set_handler(|| {
        let _held = WRITING.lock().unwrap_or_else(|p| p.into_inner());
        remove_run_files();
        exit_now(130);
    })
    .map_err(io::Error::other)
}

/// Mesa's Vulkan drivers print "error: XDG_RUNTIME_DIR is invalid or not set in the environment." when the variable
/// is unset (a cron job, a container, `sudo`), with the same `error:` prefix as strata's own errors, so a good run
/// looks failed. When it is unset, point it at a fresh private (0700) directory in the temp directory before any
/// GPU instance exists; [`remove_run_files`] removes it. Call before any other thread starts (it sets a variable).
pub fn private_runtime_dir() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_some() {
        return;
    }
    remove_dead_runtime_dirs(&std::env::temp_dir());
    // tempfile makes the directory with mode 0700 and a random name, so no other user can plant files in it.
    let Ok(dir) = tempfile::Builder::new()
        .prefix(RUNTIME_DIR_PREFIX)
        .tempdir()
    else {
        return; // Only a cosmetic loss: Mesa prints its line.
    };
    // Its owner record, locked while this process lives, tells a later run whether a directory's maker is dead.
    let Ok(owner) = std::fs::File::create(dir.path().join(RUNTIME_DIR_OWNER)) else {
        return;
    };
    if fs4::FileExt::try_lock(&owner).is_err() {
        return;
    }
    let path = dir.keep();
    std::env::set_var("XDG_RUNTIME_DIR", &path);
    *RUNTIME_DIR.lock().unwrap_or_else(|p| p.into_inner()) = Some((path, owner));
}

/// Removes the private runtime directories of runs that died without removing theirs (SIGKILL): those whose owner
/// record no process holds locked. A directory younger than a minute is left alone (its maker may not have locked
/// its record yet).
fn remove_dead_runtime_dirs(temp: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(temp) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(RUNTIME_DIR_PREFIX)
        {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(60));
        let Ok(owner) = std::fs::File::open(entry.path().join(RUNTIME_DIR_OWNER)) else {
            continue; // Not one with a record: leave it.
        };
        if old && fs4::FileExt::try_lock(&owner).is_ok() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The exit status and the message for a failed run. A closed stdout is no failure of strata's: it ends quietly.
pub fn report_error(err: &anyhow::Error) -> u8 {
    let broken_pipe = err.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    });
    if broken_pipe {
        return BROKEN_PIPE_STATUS;
    }
    // anstream drops the colour when stderr is not a terminal (or NO_COLOR is set), as clap does for its errors.
    let style = error_style();
    anstream::eprintln!("{style}error:{style:#} {}", render_chain(err));
    1
}

/// The style of the `error:` prefix: clap's (bold red).
pub fn error_style() -> anstyle::Style {
    anstyle::Style::new()
        .bold()
        .fg_color(Some(anstyle::AnsiColor::Red.into()))
}

/// `err` and its causes joined by ": ", each cause once: many errors already print their source in their own message
/// (`{path}: {source}`), which anyhow's `{:#}` would print a second time; and a cause that starts with what the text
/// already names (`writing X` then `X: No space left on device`) is printed without that name.
pub fn render_chain(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let mut part = cause.to_string();
        if part.is_empty() || text.contains(&part) {
            continue;
        }
        if let Some((head, rest)) = part.split_once(": ") {
            if !rest.is_empty() && text.contains(head) {
                part = rest.to_string();
            }
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// `STRATA_TEST_PAUSE_AT`, read once.
fn pause_phase() -> Option<&'static str> {
    static PHASE: OnceLock<Option<String>> = OnceLock::new();
    PHASE
        .get_or_init(|| std::env::var("STRATA_TEST_PAUSE_AT").ok())
        .as_deref()
}

/// A test seam for the interruption tests: when `STRATA_TEST_PAUSE_AT` names `phase` (`load`, `prefill`, `decode`,
/// `packed-write`), the first call announces it on stderr and waits `STRATA_TEST_PAUSE_SECS` (default 60) seconds,
/// so a test can deliver a signal, or break an output path, while the run is there. Does nothing otherwise.
pub fn pause_point(phase: &'static str) {
    static PAUSED: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    if pause_phase() != Some(phase) {
        return;
    }
    {
        let mut paused = PAUSED.lock().unwrap_or_else(|p| p.into_inner());
        if paused.contains(&phase) {
            return;
        }
        paused.push(phase);
    }
    let secs = std::env::var("STRATA_TEST_PAUSE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    eprintln!("strata: paused at {phase} (STRATA_TEST_PAUSE_AT)");
    std::thread::sleep(std::time::Duration::from_secs(secs));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_names_left_and_numbers_right() {
        let text = text_table(
            &["model", "layers", "weights"],
            &[1, 2],
            [
                vec!["a".into(), "12".into(), "1.00 GiB".into()],
                vec!["longer-name".into(), "4".into(), "512 B".into()],
            ],
        );
        assert_eq!(
            text,
            "model        layers   weights\n\
             a                12  1.00 GiB\n\
             longer-name       4     512 B\n"
        );
    }

    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        let io = io::Error::new(
            io::ErrorKind::NotFound,
            "No such file or directory (os error 2)",
        );
        #[derive(Debug, thiserror::Error)]
        #[error("x.npy: {source}")]
        struct Wrapped {
            #[source]
            source: io::Error,
        }
        let err = anyhow::Error::new(Wrapped { source: io }).context("writing x.npy");
        assert_eq!(
            render_chain(&err),
            "writing x.npy: No such file or directory (os error 2)"
        );
        let err = anyhow::anyhow!("inner").context("outer");
        assert_eq!(render_chain(&err), "outer: inner");
        let err = anyhow::anyhow!("/x/p.toml: No space left on device (os error 28)")
            .context("writing the profile to /x/p.toml");
        assert_eq!(
            render_chain(&err),
            "writing the profile to /x/p.toml: No space left on device (os error 28)"
        );
    }

    #[test]
    fn only_dead_and_old_runtime_dirs_are_removed() {
        let temp = tempfile::tempdir().unwrap();
        let make = |name: &str, age_secs: u64| {
            let dir = temp.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            let owner = std::fs::File::create(dir.join(RUNTIME_DIR_OWNER)).unwrap();
            let then = std::time::SystemTime::now() - std::time::Duration::from_secs(age_secs);
            std::fs::File::open(&dir)
                .unwrap()
                .set_modified(then)
                .unwrap();
            (dir, owner)
        };
        let (dead, _) = make("strata-xdg-dead", 600);
        let (young, _) = make("strata-xdg-young", 0);
        let (live, owner) = make("strata-xdg-live", 600);
        fs4::FileExt::try_lock(&owner).unwrap();
        let other = temp.path().join("strata-xdg-no-record");
        std::fs::create_dir(&other).unwrap();
        remove_dead_runtime_dirs(temp.path());
        assert!(!dead.exists());
        assert!(young.exists() && live.exists() && other.exists());
    }

    #[test]
    fn a_closed_stdout_is_quiet() {
        let err =
            anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe)).context("printing");
        assert_eq!(report_error(&err), BROKEN_PIPE_STATUS);
    }
}
