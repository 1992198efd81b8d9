//! Who may use the built-in broker, and for what: Mosquitto's password file
//! and ACL file, read and decided on.
//!
//! Both files are the ones Mosquitto 2 reads, so an operator's existing
//! files and `mosquitto_passwd` serve unchanged.
//!
//! # Password file
//!
//! One `user:hash` line per user; `#` starts a comment line. The hashes are
//! what `mosquitto_passwd` writes: `$7$ITERATIONS$SALT$HASH` (PBKDF2 with
//! HMAC-SHA512, its default since Mosquitto 2.0) and the older
//! `$6$SALT$HASH` (one SHA-512 of the password followed by the salt), salt
//! and hash in standard base64. A plain-text password is refused, as
//! Mosquitto refuses it.
//!
//! # ACL file
//!
//! Lines, in Mosquitto's syntax:
//!
//! * `user NAME`: the `topic` lines after it are that user's;
//! * `topic [read|write|readwrite|deny] FILTER`: a rule of the user above,
//!   or, before any `user` line, of anonymous clients; `readwrite` when the
//!   access is left out;
//! * `pattern [read|write|readwrite|deny] FILTER`: a rule of every client,
//!   where `%c` stands for its client id and `%u` for its user name. A
//!   pattern does not apply to a client whose substituted value is missing
//!   (`%u` of an anonymous client) or contains `+`, `#`, `/` or `%`: such a
//!   client id could otherwise reach into another client's topics.
//!
//! With an ACL file, what no rule grants is denied; a `deny` rule that
//! matches wins over any grant. `write` governs publishing (and a client's
//! will), `read` receiving: each message is checked against the receiver's
//! rules as it is routed to it (Mosquitto checks as it delivers). A subscription is refused
//! outright when no message could ever pass: its filter overlaps no `read`
//! grant, or a `deny` rule covers all of it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest as _, Sha512};
use subtle::ConstantTimeEq as _;

use crate::route::TopicFilter;

/// A problem in one of the files, with the line it is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProblem {
    /// 1-based line number; none for the file as a whole.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for FileProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Most PBKDF2 iterations a `$7$` hash may ask for: each login costs that
/// many HMAC-SHA512 rounds, so a larger count makes password guessing a way
/// to burn the gateway's CPU. `mosquitto_passwd` writes 101 by default.
pub const MAX_ITERATIONS: u32 = 100_000;

/// A password hash as `mosquitto_passwd` writes it.
#[derive(Clone, PartialEq, Eq)]
enum Hash {
    /// `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    /// `$6$`: SHA-512 of the password, then the salt.
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
}

impl Hash {
    fn parse(text: &str) -> Result<Hash, String> {
        let field = |name: &str, b64: &str| {
            BASE64
                .decode(b64)
                .map_err(|_| format!("its {name} is not base64"))
        };
        if let Some(rest) = text.strip_prefix("$7$") {
            let mut parts = rest.split('$');
            let (Some(iterations), Some(salt), Some(hash), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err("a $7$ hash is $7$ITERATIONS$SALT$HASH".into());
            };
            let iterations: u32 = iterations
                .parse()
                .ok()
                .filter(|i| (1..=MAX_ITERATIONS).contains(i))
                .ok_or_else(|| {
                    format!("{iterations:?} iterations: expected 1 to {MAX_ITERATIONS}")
                })?;
            let hash = field("hash", hash)?;
            if hash.len() != 64 {
                return Err("its hash is not 64 bytes (PBKDF2-SHA512)".into());
            }
            Ok(Hash::Pbkdf2 {
                iterations,
                salt: field("salt", salt)?,
                hash,
            })
        } else if let Some(rest) = text.strip_prefix("$6$") {
            let Some((salt, hash)) = rest.split_once('$') else {
                return Err("a $6$ hash is $6$SALT$HASH".into());
            };
            let hash = field("hash", hash)?;
            if hash.len() != 64 {
                return Err("its hash is not 64 bytes (SHA-512)".into());
            }
            Ok(Hash::Sha512 {
                salt: field("salt", salt)?,
                hash,
            })
        } else {
            Err("the password is not hashed: hash the file with `mosquitto_passwd -U FILE`".into())
        }
    }

    fn verify(&self, password: &[u8]) -> bool {
        let mut computed = [0u8; 64];
        let expected = match self {
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => {
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut computed);
                hash
            }
            Hash::Sha512 { salt, hash } => {
                let mut h = Sha512::new();
                h.update(password);
                h.update(salt);
                computed.copy_from_slice(&h.finalize());
                hash
            }
        };
        computed.ct_eq(expected.as_slice()).into()
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hash::Pbkdf2 { iterations, .. } => write!(f, "$7$ ({iterations} iterations)"),
            Hash::Sha512 { .. } => f.write_str("$6$"),
        }
    }
}

/// The users of a password file and their hashes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Passwords {
    users: HashMap<String, Hash>,
    /// Most `$7$` iterations of the file: what a login of an unknown user
    /// costs, so that it takes as long as a known user's.
    dummy_iterations: u32,
}

/// The answer to a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Login {
    /// The password is the user's.
    Accepted,
    /// No such user.
    UnknownUser,
    /// The user exists; the password is not theirs.
    BadPassword,
}

impl Passwords {
    /// Parses a password file's text; every bad line is a problem.
    pub fn parse(text: &str) -> Result<Passwords, Vec<FileProblem>> {
        let mut users = HashMap::new();
        let mut problems = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let problem = |message: String| FileProblem {
                line: Some(n + 1),
                message,
            };
            let Some((user, hash)) = line.split_once(':') else {
                problems.push(problem("expected USER:HASH".into()));
                continue;
            };
            if user.is_empty() {
                problems.push(problem("the user name is empty".into()));
                continue;
            }
            match Hash::parse(hash) {
                Ok(hash) => {
                    if users.insert(user.to_owned(), hash).is_some() {
                        problems.push(problem(format!("user {user:?} is listed twice")));
                    }
                }
                Err(message) => problems.push(problem(format!("user {user:?}: {message}"))),
            }
        }
        let dummy_iterations = users
            .values()
            .filter_map(|h| match h {
                Hash::Pbkdf2 { iterations, .. } => Some(*iterations),
                Hash::Sha512 { .. } => None,
            })
            .max()
            .unwrap_or(1);
        if problems.is_empty() {
            Ok(Passwords {
                users,
                dummy_iterations,
            })
        } else {
            Err(problems)
        }
    }

    /// Whether `password` is `user`'s. Costs one hash whether or not the
    /// user exists, so that the time taken does not tell which.
    pub fn check(&self, user: &str, password: &[u8]) -> Login {
        match self.users.get(user) {
            Some(hash) if hash.verify(password) => Login::Accepted,
            Some(_) => Login::BadPassword,
            None => {
                let dummy = Hash::Pbkdf2 {
                    iterations: self.dummy_iterations,
                    salt: vec![0; 12],
                    hash: vec![0; 64],
                };
                let _ = dummy.verify(password);
                Login::UnknownUser
            }
        }
    }

    /// Whether `user` has the same entry in `other` (a reloaded file): a
    /// client logged in as `user` keeps its connection only then.
    pub fn same_user(&self, other: &Passwords, user: &str) -> bool {
        match (self.users.get(user), other.users.get(user)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        }
    }

    /// How many users the file has.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file has no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// What a rule lets a client do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Right {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Right {
    fn grants(self, wanted: Want) -> bool {
        matches!(
            (self, wanted),
            (Right::Read | Right::ReadWrite, Want::Read)
                | (Right::Write | Right::ReadWrite, Want::Write)
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Read,
    Write,
}

/// One `topic` or `pattern` line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    right: Right,
    /// The filter as written (with `%c`/`%u` for a pattern), checked once
    /// as it is read.
    filter: TopicFilter,
}

/// The rules of an ACL file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    /// `topic` lines before any `user` line.
    anonymous: Vec<Rule>,
    /// `topic` lines by the `user` line above them.
    users: HashMap<String, Vec<Rule>>,
    /// `pattern` lines.
    patterns: Vec<Rule>,
}

/// Who a client is, for the ACL.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    /// Its client id.
    pub id: &'a str,
    /// Its user name, if it logged in.
    pub user: Option<&'a str>,
}

impl Acl {
    /// Parses an ACL file's text; every bad line is a problem.
    pub fn parse(text: &str) -> Result<Acl, Vec<FileProblem>> {
        let mut acl = Acl::default();
        let mut problems = Vec::new();
        let mut user: Option<String> = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let problem = |message: String| FileProblem {
                line: Some(n + 1),
                message,
            };
            let (keyword, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
            let rest = rest.trim_start();
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        problems.push(problem("`user` needs a name".into()));
                    } else {
                        acl.users.entry(rest.to_owned()).or_default();
                        user = Some(rest.to_owned());
                    }
                }
                "topic" | "pattern" => {
                    let (right, filter) = match rest.split_once([' ', '\t']) {
                        Some((word, filter)) => match word {
                            "read" => (Right::Read, filter.trim_start()),
                            "write" => (Right::Write, filter.trim_start()),
                            "readwrite" => (Right::ReadWrite, filter.trim_start()),
                            "deny" => (Right::Deny, filter.trim_start()),
                            _ => (Right::ReadWrite, rest),
                        },
                        None if matches!(rest, "read" | "write" | "readwrite" | "deny") => {
                            (Right::ReadWrite, "")
                        }
                        None => (Right::ReadWrite, rest),
                    };
                    if filter.is_empty() {
                        problems.push(problem(format!("`{keyword}` needs a topic filter")));
                        continue;
                    }
                    let filter = match TopicFilter::new(filter) {
                        Ok(filter) => filter,
                        Err(e) => {
                            problems.push(problem(format!("{filter:?}: {e}")));
                            continue;
                        }
                    };
                    let rule = Rule { right, filter };
                    match (keyword, &user) {
                        ("pattern", _) => acl.patterns.push(rule),
                        (_, Some(user)) => acl.users.entry(user.clone()).or_default().push(rule),
                        (_, None) => acl.anonymous.push(rule),
                    }
                }
                other => problems.push(problem(format!(
                    "unknown keyword {other:?}: expected user, topic or pattern"
                ))),
            }
        }
        if problems.is_empty() {
            Ok(acl)
        } else {
            Err(problems)
        }
    }

    /// Whether a rule depends on the user name (`user` lines, `%u`): then
    /// user names must be proven (a password file or certificates).
    pub fn names_users(&self) -> bool {
        self.users.values().any(|rules| !rules.is_empty())
            || self
                .patterns
                .iter()
                .any(|r| r.filter.as_str().contains("%u"))
    }

    /// The filters of `client`'s rules, patterns substituted. Only a
    /// pattern that names the client allocates: this runs for every
    /// message routed.
    fn rules<'a>(
        &'a self,
        client: Client<'a>,
    ) -> impl Iterator<Item = (Right, Cow<'a, TopicFilter>)> + 'a {
        let own = match client.user {
            Some(user) => self.users.get(user).map_or(&[][..], Vec::as_slice),
            None => &self.anonymous[..],
        };
        let own = own.iter().map(|r| (r.right, Cow::Borrowed(&r.filter)));
        let patterns = self.patterns.iter().filter_map(move |r| {
            if !r.filter.as_str().contains('%') {
                return Some((r.right, Cow::Borrowed(&r.filter)));
            }
            let filter = substitute(r.filter.as_str(), client)?;
            Some((r.right, Cow::Owned(TopicFilter::new(&filter).ok()?)))
        });
        own.chain(patterns)
    }

    fn may(&self, client: Client<'_>, topic: &str, wanted: Want) -> bool {
        let mut granted = false;
        for (right, filter) in self.rules(client) {
            if filter.matches(topic) {
                if right == Right::Deny {
                    return false;
                }
                granted |= right.grants(wanted);
            }
        }
        granted
    }

    /// Whether `client` may publish on `topic`.
    pub fn may_publish(&self, client: Client<'_>, topic: &str) -> bool {
        self.may(client, topic, Want::Write)
    }

    /// Whether a message on `topic` may be delivered to `client`.
    pub fn may_read(&self, client: Client<'_>, topic: &str) -> bool {
        self.may(client, topic, Want::Read)
    }

    /// Whether `client` may subscribe to `filter`: some message on it could
    /// be delivered (see the module docs).
    pub fn may_subscribe(&self, client: Client<'_>, filter: &TopicFilter) -> bool {
        let mut possible = false;
        for (right, rule) in self.rules(client) {
            if right == Right::Deny && rule.covers(filter) {
                return false;
            }
            possible |= right.grants(Want::Read) && rule.overlaps(filter);
        }
        possible
    }
}

/// `filter` with `%c` and `%u` replaced by `client`'s; none when a value it
/// needs is missing or holds a wildcard or level separator.
fn substitute(filter: &str, client: Client<'_>) -> Option<String> {
    // `%` too: a client id `%u` must not become the user name.
    let safe = |value: &str| !value.is_empty() && !value.contains(['+', '#', '/', '%']);
    let mut out = filter.to_owned();
    if filter.contains("%c") {
        if !safe(client.id) {
            return None;
        }
        out = out.replace("%c", client.id);
    }
    if filter.contains("%u") {
        let user = client.user.filter(|u| safe(u))?;
        out = out.replace("%u", user);
    }
    Some(out)
}

/// The built-in broker's access rules: who may connect, and what they may do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// The password file; none: user names are not checked.
    pub passwords: Option<Passwords>,
    /// The ACL file; none: every client may publish and subscribe anywhere.
    pub acl: Option<Acl>,
    /// Whether a client without a user name may connect.
    pub allow_anonymous: bool,
}

/// Where the access rules come from: `[local]`'s keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessFiles {
    /// `password_file`, resolved.
    pub password_file: Option<std::path::PathBuf>,
    /// `acl_file`, resolved.
    pub acl_file: Option<std::path::PathBuf>,
    /// `allow_anonymous`.
    pub allow_anonymous: bool,
}

impl AccessFiles {
    /// Reads both files. A problem is keyed `password_file` or `acl_file`.
    pub fn load(&self) -> Result<Access, Vec<(&'static str, FileProblem)>> {
        let mut problems = Vec::new();
        let passwords = read(&self.password_file, Passwords::parse)
            .map_err(|p| problems.extend(p.into_iter().map(|p| ("password_file", p))))
            .ok()
            .flatten();
        let acl = read(&self.acl_file, Acl::parse)
            .map_err(|p| problems.extend(p.into_iter().map(|p| ("acl_file", p))))
            .ok()
            .flatten();
        if problems.is_empty() {
            Ok(Access {
                passwords,
                acl,
                allow_anonymous: self.allow_anonymous,
            })
        } else {
            Err(problems)
        }
    }

    /// Whether anything restricts clients (else the broker takes any client).
    pub fn restricts(&self) -> bool {
        self.password_file.is_some() || self.acl_file.is_some() || !self.allow_anonymous
    }
}

fn read<T>(
    path: &Option<std::path::PathBuf>,
    parse: fn(&str) -> Result<T, Vec<FileProblem>>,
) -> Result<Option<T>, Vec<FileProblem>> {
    let Some(path) = path else {
        return Ok(None);
    };
    let text = read_text(path).map_err(|message| {
        vec![FileProblem {
            line: None,
            message,
        }]
    })?;
    parse(&text).map(Some)
}

fn read_text(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `mosquitto_passwd -b FILE alice secret` (Mosquitto 2.0.11).
    const ALICE: &str = "alice:$7$101$FsKQz/Jv5ZP2QWaB$sf6R/XciWqt21+5+lnURM/3ywqdlPZW6UAbS0rEnVv8f2RHZmKZRIwhh+hRZHEWthmWgUjohP/u4S4PE4KzhLA==";
    /// `$6$`: base64(salt 01..0c), base64(SHA-512("old-secret" ‖ salt)).
    const BOB: &str = "bob:$6$AQIDBAUGBwgJCgsM$q8WZNGxz4gZSUVFmhfLpzJLMmkwMchRq4rrNP7ob6znEaTy8+k8sd0LgD3p+C1UZjuANnLi21QfjnVQBEn0gFQ==";

    #[test]
    fn mosquitto_passwd_hashes_of_both_kinds_verify() {
        let p = Passwords::parse(&format!("# users\n{ALICE}\n\n{BOB}\n")).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p.check("alice", b"secret"), Login::Accepted);
        assert_eq!(p.check("alice", b"Secret"), Login::BadPassword);
        assert_eq!(p.check("bob", b"old-secret"), Login::Accepted);
        assert_eq!(p.check("bob", b"secret"), Login::BadPassword);
        assert_eq!(p.check("carol", b"secret"), Login::UnknownUser);
    }

    #[test]
    fn bad_password_lines_are_named_by_line() {
        let text = format!(
            "{ALICE}\nplain:secret\nnocolon\n$7$1$AA==$AA==\n{ALICE}\nx:$7$999999999$AA==$AA==\n"
        );
        let problems = Passwords::parse(&text).unwrap_err();
        let lines: Vec<_> = problems.iter().map(|p| p.line.unwrap()).collect();
        assert_eq!(lines, [2, 3, 4, 5, 6], "{problems:?}");
        assert!(problems[0].message.contains("mosquitto_passwd -U"));
        assert!(problems[3].message.contains("twice"));
        assert!(problems[4].message.contains("iterations"));
    }

    #[test]
    fn a_changed_or_removed_user_is_not_the_same_after_a_reload() {
        let before = Passwords::parse(&format!("{ALICE}\n{BOB}\n")).unwrap();
        let after = Passwords::parse(&format!(
            "{ALICE}\nbob:$6$AQIDBAUGBwgJCgsM$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==\n"
        ))
        .unwrap();
        assert!(before.same_user(&after, "alice"));
        assert!(!before.same_user(&after, "bob"));
        assert!(!before.same_user(&Passwords::default(), "alice"));
    }

    fn client<'a>(id: &'a str, user: Option<&'a str>) -> Client<'a> {
        Client { id, user }
    }

    const ACL: &str = "\
# anonymous clients
topic read public/#

user alice
topic readwrite alice/#
topic sensors/shared
topic deny alice/secret/#

user bob
topic write bob/in

pattern write sensors/%c/#
pattern read devices/%u/cmd
";

    #[test]
    fn topic_lines_belong_to_the_user_above_them_or_to_anonymous_clients() {
        let acl = Acl::parse(ACL).unwrap();
        let anon = client("a1", None);
        let alice = client("a2", Some("alice"));
        let bob = client("b", Some("bob"));
        assert!(acl.may_read(anon, "public/news"));
        assert!(!acl.may_publish(anon, "public/news"));
        assert!(!acl.may_read(alice, "public/news"));
        assert!(acl.may_publish(alice, "alice/x"));
        assert!(acl.may_read(alice, "alice/x"));
        assert!(
            acl.may_publish(alice, "sensors/shared"),
            "readwrite by default"
        );
        assert!(!acl.may_publish(alice, "alice/secret/key"), "deny wins");
        assert!(
            !acl.may_read(alice, "alice/secret"),
            "deny wins, # matches the parent"
        );
        assert!(acl.may_publish(bob, "bob/in"));
        assert!(!acl.may_read(bob, "bob/in"));
        assert!(!acl.may_publish(bob, "alice/x"));
    }

    #[test]
    fn patterns_give_each_client_its_own_topics_and_no_other() {
        let acl = Acl::parse(ACL).unwrap();
        let dev = client("dev1", None);
        assert!(acl.may_publish(dev, "sensors/dev1/temp"));
        assert!(!acl.may_publish(dev, "sensors/dev2/temp"));
        assert!(
            !acl.may_read(dev, "devices/dev1/cmd"),
            "no user name: %u does not apply"
        );
        let bob = client("dev2", Some("bob"));
        assert!(acl.may_read(bob, "devices/bob/cmd"));
        assert!(!acl.may_read(bob, "devices/alice/cmd"));
        for sneaky in ["dev1/x", "+", "#"] {
            let c = client(sneaky, None);
            assert!(!acl.may_publish(c, "sensors/dev1/x/temp"), "{sneaky}");
            assert!(
                !acl.may_publish(c, &format!("sensors/{sneaky}/t")),
                "{sneaky}"
            );
        }
    }

    #[test]
    fn a_subscription_is_refused_only_when_no_message_could_pass() {
        let acl = Acl::parse(ACL).unwrap();
        let alice = client("a", Some("alice"));
        let f = |s: &str| TopicFilter::new(s).unwrap();
        assert!(acl.may_subscribe(alice, &f("alice/#")));
        assert!(acl.may_subscribe(alice, &f("#")), "overlaps alice/#");
        assert!(acl.may_subscribe(alice, &f("+/x")));
        assert!(!acl.may_subscribe(alice, &f("bob/#")));
        assert!(
            !acl.may_subscribe(alice, &f("alice/secret/+")),
            "a deny covers it"
        );
        assert!(
            acl.may_subscribe(alice, &f("alice/+")),
            "alice/secret is denied, alice/x is not"
        );
        let bob = client("b", Some("bob"));
        assert!(!acl.may_subscribe(bob, &f("bob/in")), "write only");
    }

    #[test]
    fn bad_acl_lines_are_named_by_line() {
        let problems =
            Acl::parse("user\ntopic read a/#/b\nfoo bar\npattern read\ntopic ok\n").unwrap_err();
        let lines: Vec<_> = problems.iter().map(|p| p.line.unwrap()).collect();
        assert_eq!(lines, [1, 2, 3, 4], "{problems:?}");
    }
}
