//! The built-in broker's keys: who may connect to it, and what they may do.

use super::*;
use crate::access::AccessFiles;

/// Checks `password_file`, `acl_file` and `allow_anonymous` (whose default
/// is true only on a loopback `listen`), reading both files so that their
/// problems are reported by line. A listener off loopback that would take
/// nobody is an error; one that takes anonymous clients, a warning.
pub(super) fn check_access(
    p: &mut Checker,
    raw: &LocalTable,
    listen: SocketAddr,
    base: &Path,
) -> AccessFiles {
    let loopback = listen.ip().is_loopback();
    let files = AccessFiles {
        password_file: raw.password_file.as_ref().map(|f| base.join(f)),
        acl_file: raw.acl_file.as_ref().map(|f| base.join(f)),
        allow_anonymous: raw.allow_anonymous.unwrap_or(loopback),
    };
    if let Err(problems) = files.load() {
        for (key, problem) in problems {
            p.push(format!("local.{key}"), problem.to_string());
        }
    }
    if loopback {
        return files;
    }
    if files.allow_anonymous {
        p.warnings.push(Problem {
            key: "local.allow_anonymous".into(),
            message: format!(
                "the built-in broker on {listen} takes clients without a user name from the network{}; keep it on a network whose devices you trust, or set allow_anonymous = false (docs/BROKER.md)",
                if files.acl_file.is_some() { " (within the acl_file's anonymous rules)" } else { ", and lets them publish and subscribe anywhere" }
            ),
        });
    } else if files.password_file.is_none() {
        p.push(
            "local.password_file",
            format!(
                "is missing: the built-in broker on {listen} takes no client without a user name off loopback (allow_anonymous defaults to false there), so no device could connect; create one with `mosquitto_passwd -c FILE USER` and set password_file, or set allow_anonymous = true to take any client on this network"
            ),
        );
    }
    files
}
