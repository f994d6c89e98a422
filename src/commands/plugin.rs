//! The binary as a kubectl plugin: installed or linked as `kubectl-bzx`, it answers
//! `kubectl bzx <subcommand>` with the same subcommands.

use std::ffi::OsStr;
use std::path::Path;

/// The file name kubectl looks for on `PATH` to run `kubectl bzx`.
pub const PLUGIN_FILE: &str = "kubectl-bzx";

/// How help and usage name the program when invoked as `argv0`: `kubectl bzx` for the
/// plugin, `None` (the binary's own name) otherwise.
pub fn bin_name(argv0: &OsStr) -> Option<&'static str> {
    let file = Path::new(argv0).file_stem()?;
    (file == PLUGIN_FILE).then_some("kubectl bzx")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_is_recognised_by_its_file_name() {
        for plugin in [
            "kubectl-bzx",
            "/usr/local/bin/kubectl-bzx",
            "./kubectl-bzx",
            "kubectl-bzx.exe",
        ] {
            assert_eq!(
                bin_name(OsStr::new(plugin)),
                Some("kubectl bzx"),
                "{plugin}"
            );
        }
        for other in [
            "braze-export-operator",
            "/bin/braze-export-operator",
            "kubectl-bzx-old",
            "",
        ] {
            assert_eq!(bin_name(OsStr::new(other)), None, "{other}");
        }
    }
}
