//! The command line's conventions as a user meets them: grouped help with short flags, "did you mean" for model
//! names, plain errors off a terminal, readable sizes that read back, completions and man pages.

use std::process::Command;

use strata_runtime::offload::policy::parse_bytes;

fn strata(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .env_remove("CLICOLOR_FORCE")
        .output()
        .expect("run strata");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_groups_flags_under_headings_in_order_with_short_flags() {
    let (ok, help, err) = strata(&["generate", "--help"]);
    assert!(ok, "{err}");
    let headings = [
        "Model:",
        "Prompts:",
        "Sampling:",
        "Policy:",
        "Memory caps:",
        "Compression:",
        "Output:",
    ];
    let at: Vec<usize> = headings
        .iter()
        .map(|h| {
            help.lines()
                .position(|l| l == *h)
                .unwrap_or_else(|| panic!("no heading {h} in:\n{help}"))
        })
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{at:?}\n{help}");
    for flag in [
        "-m, --model <NAME_OR_DIR>",
        "-p, --prompt <TEXT>",
        "-n, --max-new-tokens <N>",
        "--gpu-mem <SIZE>",
        "--offload-dir <DIR>",
    ] {
        assert!(help.contains(flag), "no `{flag}` in:\n{help}");
    }
    // Each flag sits under its own heading: --gpu-mem under the caps, --compress-weight under compression.
    let line = |flag: &str| help.lines().position(|l| l.contains(flag)).unwrap();
    assert!(line("--gpu-mem") > at[4] && line("--gpu-mem") < at[5]);
    assert!(line("--compress-weight ") > at[5] && line("--compress-weight ") < at[6]);
    // The packed-weights help is about packed weights only.
    let packed = &help[help.find("--packed-weights").unwrap()..];
    let first = packed.lines().nth(1).unwrap().trim();
    assert!(first.starts_with("A packed checkpoint"), "{first}");

    let (ok, help, err) = strata(&["policy", "--help"]);
    assert!(ok, "{err}");
    assert!(help.contains("-m, --model <NAME>"), "{help}");
    assert!(help.contains("required unless --evaluate"), "{help}");
}

#[test]
fn an_unknown_model_suggests_the_closest_name_in_plain_text_off_a_terminal() {
    let (ok, _, err) = strata(&["policy", "-m", "opt-13", "--gpu-mem", "15GiB"]);
    assert!(!ok);
    assert!(err.contains("did you mean `opt-13b`?"), "{err}");
    // stderr is a pipe here: no colour codes.
    assert!(
        err.starts_with("error: ") && !err.contains('\x1b'),
        "{err:?}"
    );
    let (ok, _, err) = strata(&[
        "generate",
        "-m",
        "opt-6.7",
        "--dummy",
        "-n",
        "1",
        "--prompt-ids",
        "2",
    ]);
    assert!(!ok);
    assert!(err.contains("did you mean `opt-6.7b`?"), "{err}");
    let (ok, _, err) = strata(&["policy", "-m", "llama-7b", "--gpu-mem", "15GiB"]);
    assert!(!ok && !err.contains("did you mean"), "{err}");
}

#[test]
fn an_error_is_coloured_when_forced_as_on_a_terminal() {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["policy", "-m", "opt-13", "--gpu-mem", "15GiB"])
        .env("CLICOLOR_FORCE", "1")
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("\x1b[1m\x1b[31merror:\x1b[0m "), "{err:?}");
}

#[test]
fn policy_prints_readable_caps_that_read_back_to_at_least_the_planned_bytes() {
    let caps = [
        ("--gpu-mem", "15GiB"),
        ("--cpu-mem", "15223424KiB"),
        ("--disk-mem", "1234567890123"),
    ];
    let mut args = vec!["policy", "-m", "opt-30b"];
    for (flag, size) in caps {
        args.extend([flag, size]);
    }
    let (ok, out, err) = strata(&args);
    assert!(ok, "{err}");
    let flags: Vec<&str> = out
        .lines()
        .find(|l| l.trim_start().starts_with("--gpu-batch-size"))
        .unwrap_or_else(|| panic!("no flags line in:\n{out}"))
        .split_whitespace()
        .collect();
    for (flag, given) in caps {
        let printed = flags[flags.iter().position(|f| *f == flag).unwrap() + 1];
        let (planned, back) = (parse_bytes(given).unwrap(), parse_bytes(printed).unwrap());
        assert!(
            back >= planned && back - planned <= planned / 1000,
            "{flag} {given} printed as {printed}"
        );
    }
    assert!(out.contains("--cpu-mem 14.52GiB"), "{out}");
    // The printed line is a policy `strata policy --evaluate` accepts as it stands.
    let mut evaluate = vec!["policy", "-m", "opt-30b", "--evaluate"];
    evaluate.extend(&flags);
    let (ok, _, err) = strata(&evaluate);
    assert!(ok, "{evaluate:?}: {err}");
}

#[test]
fn completions_and_man_pages_are_generated_from_the_command_line() {
    let (ok, script, err) = strata(&["completions", "bash"]);
    assert!(ok, "{err}");
    for word in ["_strata", "generate", "policy", "bench", "--max-new-tokens"] {
        assert!(script.contains(word), "no {word} in the bash script");
    }
    let (ok, page, err) = strata(&["man"]);
    assert!(ok, "{err}");
    assert!(
        page.contains(".TH strata 1") && page.contains("generate"),
        "{page}"
    );

    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = strata(&["man", dir.path().to_str().unwrap()]);
    assert!(ok, "{err}");
    let generate = std::fs::read_to_string(dir.path().join("strata-generate.1")).unwrap();
    assert!(generate.contains("max\\-new\\-tokens"), "{generate}");
    // Hidden from the everyday help.
    let (_, help, _) = strata(&["--help"]);
    assert!(
        !help.contains("completions ") && !help.lines().any(|l| l.trim_start().starts_with("man ")),
        "{help}"
    );
}
