//! Command validation: every limit a job spec must respect before it is ever
//! proposed to the log, and the defaults of the optional fields.
//!
//! Validation runs before proposing, so bad input changes nothing; the
//! reducer stays total on its own and never relies on it.

use crate::model::{Checkout, JobSpec, Labels, Resources, Workspace};

pub const PRIORITY_DEFAULT: u8 = 50;
pub const PRIORITY_MAX: u8 = 100;
pub const TIMEOUT_SECS_DEFAULT: u64 = 3600;
/// One week: a CI job running longer is a mistake.
pub const TIMEOUT_SECS_MAX: u64 = 7 * 24 * 3600;
pub const MAX_RETRIES_DEFAULT: u32 = 0;
pub const MAX_RETRIES_MAX: u32 = 100;
pub const RESOURCES_DEFAULT: Resources = Resources::new(1000, 256);
/// 1024 cores and 16 TiB: anything larger is a typo, not a machine.
pub const CPU_MILLIS_MAX: u64 = 1024 * 1000;
pub const MEMORY_MB_MAX: u64 = 16 * 1024 * 1024;
pub const COMMAND_ARGS_MAX: usize = 4096;
pub const COMMAND_BYTES_MAX: usize = 256 * 1024;
pub const NAME_BYTES_MAX: usize = 256;
pub const ENV_VARS_MAX: usize = 256;
pub const ENV_BYTES_MAX: usize = 64 * 1024;
pub const LABELS_MAX: usize = 64;
pub const LABEL_BYTES_MAX: usize = 256;
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 256;
pub const NODE_NAME_BYTES_MAX: usize = 128;
/// Longest reason given for removing a node.
pub const REASON_BYTES_MAX: usize = 1024;
/// Longest `workdir` (Linux's `PATH_MAX`, terminating NUL included).
pub const WORKDIR_BYTES_MAX: usize = 4095;
/// Longest `checkout.repo`: a path or a URL.
pub const CHECKOUT_REPO_BYTES_MAX: usize = 4095;
/// Longest `checkout.ref`: a branch, a tag or a commit id.
pub const CHECKOUT_REF_BYTES_MAX: usize = 1024;
/// The ref a checkout takes when none is given: the repository's default
/// branch.
pub const CHECKOUT_REF_DEFAULT: &str = "HEAD";

const _: () = assert!(PRIORITY_DEFAULT <= PRIORITY_MAX);
const _: () = assert!(TIMEOUT_SECS_DEFAULT <= TIMEOUT_SECS_MAX);
const _: () = assert!(RESOURCES_DEFAULT.cpu_millis <= CPU_MILLIS_MAX);
const _: () = assert!(RESOURCES_DEFAULT.memory_mb <= MEMORY_MB_MAX);

/// Why a command was refused. The message is shown to users as is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    #[error("command must not be empty")]
    EmptyCommand,
    #[error("command[0] (the program) must not be empty")]
    EmptyProgram,
    #[error("command has {0} arguments; at most {COMMAND_ARGS_MAX} are allowed")]
    TooManyArgs(usize),
    #[error("command is {0} bytes; at most {COMMAND_BYTES_MAX} are allowed")]
    CommandTooLong(usize),
    #[error("{field} contains a NUL byte")]
    NulByte { field: &'static str },
    #[error("name is {0} bytes; at most {NAME_BYTES_MAX} are allowed")]
    NameTooLong(usize),
    #[error("priority {0} is out of range 0..={PRIORITY_MAX}")]
    Priority(u64),
    #[error("timeout_secs {0} is out of range 1..={TIMEOUT_SECS_MAX}")]
    Timeout(u64),
    #[error("max_retries {0} is out of range 0..={MAX_RETRIES_MAX}")]
    Retries(u64),
    #[error("resources.cpu_millis {0} is out of range 1..={CPU_MILLIS_MAX}")]
    Cpu(u64),
    #[error("resources.memory_mb {0} is out of range 1..={MEMORY_MB_MAX}")]
    Memory(u64),
    #[error("env has {0} variables; at most {ENV_VARS_MAX} are allowed")]
    TooManyEnv(usize),
    #[error("reason is {0} bytes; at most {REASON_BYTES_MAX} are allowed")]
    ReasonTooLong(usize),
    #[error("a node incarnation must not be 0")]
    ZeroIncarnation,
    #[error("env is {0} bytes; at most {ENV_BYTES_MAX} are allowed")]
    EnvTooLong(usize),
    #[error("env name {0:?} is invalid (empty, or contains '=')")]
    EnvName(String),
    #[error("{field} has {count} entries; at most {LABELS_MAX} are allowed")]
    TooManyLabels { field: &'static str, count: usize },
    #[error("{field} key or value {value:?} is empty or longer than {LABEL_BYTES_MAX} bytes")]
    Label { field: &'static str, value: String },
    #[error("idempotency key must be 1..={IDEMPOTENCY_KEY_BYTES_MAX} bytes")]
    IdempotencyKey,
    #[error("node name must be 1..={NODE_NAME_BYTES_MAX} bytes of [A-Za-z0-9._-]")]
    NodeName,
    #[error("workdir {0:?} must be an absolute path (starting with '/') of at most {WORKDIR_BYTES_MAX} bytes")]
    Workdir(String),
    #[error(
        "workdir and checkout cannot both be set: a checkout goes into the attempt's own work dir"
    )]
    WorkdirAndCheckout,
    #[error("checkout.repo {0:?} must be a URL (https://, ssh://, git://, file://...), user@host:path or an absolute path, of at most {CHECKOUT_REPO_BYTES_MAX} bytes, not starting with '-'")]
    CheckoutRepo(String),
    #[error("checkout.ref {0:?} is not a branch, tag or commit name: it must be 1..={CHECKOUT_REF_BYTES_MAX} bytes, not start with '-' or end with '/' or '.', and hold no whitespace, control character, '..', '@{{', '//' or any of ~^:?*[\\")]
    CheckoutRef(String),
}

fn no_nul(s: &str, field: &'static str) -> Result<(), ValidationError> {
    if s.contains('\0') {
        return Err(ValidationError::NulByte { field });
    }
    Ok(())
}

/// Checks a job spec against every limit.
pub fn validate_spec(spec: &JobSpec) -> Result<(), ValidationError> {
    let Some(program) = spec.command.first() else {
        return Err(ValidationError::EmptyCommand);
    };
    if program.is_empty() {
        return Err(ValidationError::EmptyProgram);
    }
    if spec.command.len() > COMMAND_ARGS_MAX {
        return Err(ValidationError::TooManyArgs(spec.command.len()));
    }
    let bytes: usize = spec.command.iter().map(|a| a.len()).sum();
    if bytes > COMMAND_BYTES_MAX {
        return Err(ValidationError::CommandTooLong(bytes));
    }
    for arg in &spec.command {
        no_nul(arg, "command")?;
    }
    if spec.name.len() > NAME_BYTES_MAX {
        return Err(ValidationError::NameTooLong(spec.name.len()));
    }
    no_nul(&spec.name, "name")?;
    validate_numbers(spec)?;
    validate_env(spec)?;
    validate_labels(&spec.constraints, "constraints")?;
    validate_workspace(&spec.workspace)
}

/// Checks what only the text can tell; whether the directory exists, or
/// the repository has the ref, only the node knows when the attempt starts.
pub fn validate_workspace(workspace: &Workspace) -> Result<(), ValidationError> {
    match workspace {
        Workspace::Fresh => Ok(()),
        Workspace::Dir(dir) => {
            no_nul(dir, "workdir")?;
            if !dir.starts_with('/') || dir.len() > WORKDIR_BYTES_MAX {
                return Err(ValidationError::Workdir(dir.clone()));
            }
            Ok(())
        }
        Workspace::Checkout(Checkout { repo, git_ref }) => {
            no_nul(repo, "checkout.repo")?;
            no_nul(git_ref, "checkout.ref")?;
            if !valid_repo(repo) {
                return Err(ValidationError::CheckoutRepo(repo.clone()));
            }
            if !valid_git_ref(git_ref) {
                return Err(ValidationError::CheckoutRef(git_ref.clone()));
            }
            Ok(())
        }
    }
}

/// An absolute path, a URL (`scheme://...`) or git's scp-like
/// `[user@]host:path`. Not a relative path (relative to what, on the
/// node?), nor git's `transport::address` helper syntax, nor anything that
/// could be read as an option.
fn valid_repo(repo: &str) -> bool {
    if repo.is_empty()
        || repo.len() > CHECKOUT_REPO_BYTES_MAX
        || repo.starts_with('-')
        || repo.chars().any(char::is_control)
    {
        return false;
    }
    if repo.starts_with('/') {
        return true;
    }
    if let Some((scheme, rest)) = repo.split_once("://") {
        return !scheme.is_empty()
            && !rest.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    }
    // scp-like: a colon before the first slash, and a host before it.
    match repo.split_once(':') {
        Some((host, path)) => !host.is_empty() && !host.contains('/') && !path.starts_with(':'),
        None => false,
    }
}

/// What git accepts as a branch, tag or commit name, conservatively (after
/// `git check-ref-format`): enough that a ref can never be read as an
/// option or a revision range.
fn valid_git_ref(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= CHECKOUT_REF_BYTES_MAX
        && !r.starts_with(['-', '/'])
        && !r.ends_with(['/', '.'])
        && !r.ends_with(".lock")
        && !r.contains("..")
        && !r.contains("@{")
        && !r.contains("//")
        && !r
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\".contains(c))
}

fn validate_numbers(spec: &JobSpec) -> Result<(), ValidationError> {
    if spec.priority > PRIORITY_MAX {
        return Err(ValidationError::Priority(spec.priority.into()));
    }
    if spec.timeout_secs == 0 || spec.timeout_secs > TIMEOUT_SECS_MAX {
        return Err(ValidationError::Timeout(spec.timeout_secs));
    }
    if spec.max_retries > MAX_RETRIES_MAX {
        return Err(ValidationError::Retries(spec.max_retries.into()));
    }
    validate_resources(&spec.resources)
}

pub fn validate_resources(r: &Resources) -> Result<(), ValidationError> {
    if r.cpu_millis == 0 || r.cpu_millis > CPU_MILLIS_MAX {
        return Err(ValidationError::Cpu(r.cpu_millis));
    }
    if r.memory_mb == 0 || r.memory_mb > MEMORY_MB_MAX {
        return Err(ValidationError::Memory(r.memory_mb));
    }
    Ok(())
}

fn validate_env(spec: &JobSpec) -> Result<(), ValidationError> {
    if spec.env.len() > ENV_VARS_MAX {
        return Err(ValidationError::TooManyEnv(spec.env.len()));
    }
    let bytes: usize = spec.env.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > ENV_BYTES_MAX {
        return Err(ValidationError::EnvTooLong(bytes));
    }
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains('=') {
            return Err(ValidationError::EnvName(k.clone()));
        }
        no_nul(k, "env")?;
        no_nul(v, "env")?;
    }
    Ok(())
}

/// Checks node labels or job constraints.
pub fn validate_labels(labels: &Labels, field: &'static str) -> Result<(), ValidationError> {
    if labels.len() > LABELS_MAX {
        return Err(ValidationError::TooManyLabels {
            field,
            count: labels.len(),
        });
    }
    for (k, v) in labels {
        for s in [k, v] {
            if s.is_empty() || s.len() > LABEL_BYTES_MAX || s.contains('\0') {
                return Err(ValidationError::Label {
                    field,
                    value: s.clone(),
                });
            }
        }
    }
    Ok(())
}

pub fn validate_idempotency_key(key: &str) -> Result<(), ValidationError> {
    if key.is_empty() || key.len() > IDEMPOTENCY_KEY_BYTES_MAX {
        return Err(ValidationError::IdempotencyKey);
    }
    Ok(())
}

pub fn validate_node_name(name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= NODE_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(ValidationError::NodeName);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn spec() -> JobSpec {
        JobSpec {
            name: "x".into(),
            command: vec!["true".into()],
            env: BTreeMap::new(),
            resources: RESOURCES_DEFAULT,
            constraints: BTreeMap::new(),
            priority: PRIORITY_DEFAULT,
            timeout_secs: TIMEOUT_SECS_DEFAULT,
            max_retries: 0,
            workspace: Workspace::Fresh,
        }
    }

    #[test]
    fn validation_accepts_defaults_and_rejects_each_bad_field() {
        assert_eq!(validate_spec(&spec()), Ok(()));
        type Mutation = fn(&mut JobSpec);
        let cases: Vec<(Mutation, ValidationError)> = vec![
            (|s| s.command.clear(), ValidationError::EmptyCommand),
            (|s| s.command[0].clear(), ValidationError::EmptyProgram),
            (|s| s.priority = 101, ValidationError::Priority(101)),
            (|s| s.timeout_secs = 0, ValidationError::Timeout(0)),
            (|s| s.resources.cpu_millis = 0, ValidationError::Cpu(0)),
            (
                |s| s.resources.memory_mb = u64::MAX,
                ValidationError::Memory(u64::MAX),
            ),
            (|s| s.max_retries = 1000, ValidationError::Retries(1000)),
            (
                |s| {
                    s.env.insert("A=B".into(), "x".into());
                },
                ValidationError::EnvName("A=B".into()),
            ),
            (
                |s| {
                    s.constraints.insert("os".into(), String::new());
                },
                ValidationError::Label {
                    field: "constraints",
                    value: String::new(),
                },
            ),
        ];
        for (mutate, want) in cases {
            let mut s = spec();
            mutate(&mut s);
            assert_eq!(validate_spec(&s), Err(want));
        }
    }

    fn checkout(repo: &str, git_ref: &str) -> Workspace {
        Workspace::Checkout(Checkout {
            repo: repo.into(),
            git_ref: git_ref.into(),
        })
    }

    #[test]
    fn validation_workdir_must_be_an_absolute_path() {
        for good in ["/", "/srv/project", "/with space/and-dash"] {
            let w = Workspace::Dir(good.into());
            assert_eq!(validate_workspace(&w), Ok(()), "{good}");
        }
        for bad in ["", "relative/dir", "./here", "~/project"] {
            let w = Workspace::Dir(bad.into());
            assert_eq!(
                validate_workspace(&w),
                Err(ValidationError::Workdir(bad.into()))
            );
        }
        let long = format!("/{}", "x".repeat(WORKDIR_BYTES_MAX));
        assert!(validate_workspace(&Workspace::Dir(long)).is_err());
        assert_eq!(
            validate_workspace(&Workspace::Dir("/a\0b".into())),
            Err(ValidationError::NulByte { field: "workdir" })
        );
    }

    #[test]
    fn validation_checkout_repos_and_refs() {
        for repo in [
            "/srv/git/project.git",
            "file:///srv/git/project.git",
            "https://example.com/org/project.git",
            "ssh://git@example.com:2222/org/project.git",
            "git@example.com:org/project.git",
        ] {
            assert_eq!(
                validate_workspace(&checkout(repo, "HEAD")),
                Ok(()),
                "{repo}"
            );
        }
        for repo in [
            "",
            "relative/path",
            "../up",
            "-uhack",
            "-oProxyCommand=x:y",
            "--upload-pack=touch /tmp/x",
            "ext::sh -c touch% /tmp/x",
            "://nothing",
            "/line\nbreak",
        ] {
            assert_eq!(
                validate_workspace(&checkout(repo, "HEAD")),
                Err(ValidationError::CheckoutRepo(repo.into())),
                "{repo}"
            );
        }
        for git_ref in [
            "HEAD",
            "main",
            "feature/checkout",
            "v1.2.3",
            "refs/tags/v1",
            "0123456789abcdef0123456789abcdef01234567",
        ] {
            assert_eq!(
                validate_workspace(&checkout("/r", git_ref)),
                Ok(()),
                "{git_ref}"
            );
        }
        for git_ref in [
            "",
            "-b",
            "--upload-pack=x",
            "main..evil",
            "a b",
            "HEAD~1",
            "HEAD^",
            "x:y",
            "topic.lock",
            "ends/",
            "/starts",
            "a//b",
            "@{-1}",
            "what?",
        ] {
            assert_eq!(
                validate_workspace(&checkout("/r", git_ref)),
                Err(ValidationError::CheckoutRef(git_ref.into())),
                "{git_ref:?}"
            );
        }
        // Through the whole spec.
        let mut s = spec();
        s.workspace = checkout("/r", "-x");
        assert_eq!(
            validate_spec(&s),
            Err(ValidationError::CheckoutRef("-x".into()))
        );
    }

    #[test]
    fn validation_node_names() {
        assert!(validate_node_name("worker-1.example").is_ok());
        assert!(validate_node_name("").is_err());
        assert!(validate_node_name("a b").is_err());
        assert!(validate_node_name(&"x".repeat(NODE_NAME_BYTES_MAX + 1)).is_err());
    }
}
