//! The README's flag table must match the binary: every flag it lists exists with the default it
//! states, and every flag the binary has is listed. Its token-minting example must mint a token
//! the server takes.

use std::collections::BTreeMap;

use clap::CommandFactory;
use wsfleet_server::config::Cli;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap()
}

fn readme_flags() -> BTreeMap<String, String> {
    let readme = readme();
    let table = readme.split("<!-- flags").nth(1).and_then(|s| s.split("<!-- /flags -->").next()).expect("flag table");
    table
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').trim_start_matches("--").to_owned(), cells[2].trim_matches('`').to_owned())
        })
        .collect()
}

#[test]
fn the_readme_flag_table_matches_the_binary() {
    let documented = readme_flags();
    let cmd = Cli::command();
    let mut actual = BTreeMap::new();
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if ["help", "version"].contains(&long) {
            continue;
        }
        let default = arg.get_default_values().first().map(|v| v.to_string_lossy().into_owned());
        actual.insert(long.to_owned(), default);
    }
    let doc_names: Vec<_> = documented.keys().collect();
    let actual_names: Vec<_> = actual.keys().collect();
    assert_eq!(doc_names, actual_names, "README flags vs --help");
    for (flag, default) in &actual {
        let doc = &documented[flag];
        match default {
            Some(d) => assert_eq!(doc, d, "default of --{flag}"),
            None => assert!(["none", "any"].contains(&doc.as_str()), "--{flag} has no default, README says {doc}"),
        }
    }
}

#[test]
fn the_readme_mints_a_token_the_server_takes() {
    use wsfleet_server::auth::{Access, Auth};
    let readme = readme();
    let script = readme
        .split("<!-- mint:")
        .nth(1)
        .and_then(|s| s.split("```python\n").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("the minting example");
    let secret = "the-readme-example-secret-32-bytes-long";
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .env("WSFLEET_JWT_SECRET", secret)
        .output()
        .expect("python3 runs the README's example");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap();
    let grant = Auth::new(secret.as_bytes(), None, None)
        .unwrap()
        .verify(token.trim(), std::time::SystemTime::now())
        .unwrap_or_else(|why| panic!("the README's token is refused: {why}"));
    assert!(grant.allows(Access::Subscribe, "news:today"));
    assert!(grant.allows(Access::Publish, "room:42"));
    assert!(!grant.allows(Access::Publish, "news:today"));
}
