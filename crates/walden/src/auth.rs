//! Bearer tokens: `[server] auth_token_file` holds one token per line (blank lines and lines
//! starting with `#` are skipped) and is read again on SIGHUP. Every gRPC call and every HTTP
//! request (bar `/healthz` with `server.public_healthz`) must carry `authorization: Bearer
//! TOKEN`. Tokens are never logged: only how many were loaded.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use anyhow::Context;
use tracing::{info, warn};

/// The accepted tokens; `None` inside means authentication is off.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    inner: Option<Arc<TokenFile>>,
}

#[derive(Debug)]
struct TokenFile {
    path: PathBuf,
    tokens: RwLock<Vec<Vec<u8>>>,
}

/// Reads the token file; an empty file is refused (it would lock every client out).
fn read_tokens(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading server.auth_token_file {}", path.display()))?;
    let tokens: Vec<Vec<u8>> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.as_bytes().to_vec())
        .collect();
    anyhow::ensure!(
        !tokens.is_empty(),
        "server.auth_token_file {} holds no token",
        path.display()
    );
    Ok(tokens)
}

/// Compares without an early exit, so the time taken says nothing about where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Tokens {
    /// Authentication off: every call is accepted.
    pub fn off() -> Self {
        Self::default()
    }

    /// Loads `path`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let tokens = read_tokens(path)?;
        info!(path = %path.display(), tokens = tokens.len(), "bearer tokens loaded");
        Ok(Self {
            inner: Some(Arc::new(TokenFile {
                path: path.to_owned(),
                tokens: RwLock::new(tokens),
            })),
        })
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The token this process presents to the other processes of its cluster (the first in its
    /// file: a cluster shares one token file).
    pub fn own(&self) -> Option<String> {
        let f = self.inner.as_ref()?;
        let tokens = f.tokens.read().unwrap_or_else(|e| e.into_inner());
        tokens
            .first()
            .map(|t| String::from_utf8_lossy(t).into_owned())
    }

    /// Reads the file again; on failure the tokens loaded before stay in force.
    pub fn reload(&self) {
        let Some(f) = &self.inner else { return };
        match read_tokens(&f.path) {
            Ok(t) => {
                info!(path = %f.path.display(), tokens = t.len(), "bearer tokens reloaded");
                *f.tokens.write().unwrap_or_else(|e| e.into_inner()) = t;
            }
            Err(e) => warn!(error = %format!("{e:#}"), "keeping the tokens loaded before"),
        }
    }

    /// Whether an `authorization` header value is accepted.
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(f) = &self.inner else { return true };
        let Some(token) = authorization.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        let tokens = f.tokens.read().unwrap_or_else(|e| e.into_inner());
        // Every token is compared, whichever matches.
        tokens.iter().fold(false, |ok, t| same(t, token) | ok)
    }

    /// The gRPC check, as a tonic interceptor.
    pub fn interceptor(
        &self,
    ) -> impl Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone + use<>
    {
        let tokens = self.clone();
        move |req: tonic::Request<()>| {
            let header = req.metadata().get("authorization").map(|v| v.as_bytes());
            if tokens.accepts(header) {
                Ok(req)
            } else {
                Err(unauthenticated())
            }
        }
    }

    /// Whether a Milvus client's `authorization` header is accepted: Milvus sends the base64
    /// of `token` or of `user:password` (pymilvus's `token=` and `user=`/`password=`); either
    /// the whole text or the password must be a listed token.
    pub fn accepts_milvus(&self, authorization: Option<&[u8]>) -> bool {
        use base64::Engine as _;
        if self.inner.is_none() {
            return true;
        }
        let Some(decoded) =
            authorization.and_then(|h| base64::engine::general_purpose::STANDARD.decode(h).ok())
        else {
            return false;
        };
        let bearer = |t: &[u8]| self.accepts(Some(&[b"Bearer ".as_slice(), t].concat()));
        let password = decoded
            .iter()
            .position(|b| *b == b':')
            .map(|i| &decoded[i + 1..]);
        bearer(&decoded) | password.is_some_and(bearer)
    }

    /// The Milvus API's check, as a tonic interceptor.
    pub fn milvus_interceptor(
        &self,
    ) -> impl Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone + use<>
    {
        let tokens = self.clone();
        move |req: tonic::Request<()>| {
            let header = req.metadata().get("authorization").map(|v| v.as_bytes());
            if tokens.accepts_milvus(header) {
                Ok(req)
            } else {
                Err(tonic::Status::unauthenticated(
                    "a valid token is required (MilvusClient(token=...))",
                ))
            }
        }
    }

    /// Reloads on every SIGHUP, for as long as the process runs.
    pub fn reload_on_sighup(&self) {
        if !self.enabled() {
            return;
        }
        let tokens = self.clone();
        tokio::spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                warn!("cannot watch SIGHUP: tokens are read only at start");
                return;
            };
            while hup.recv().await.is_some() {
                tokens.reload();
            }
        });
    }
}

/// The refusal of a call without a valid token: gRPC `UNAUTHENTICATED` with Walden's typed
/// error (code 21) in its details, like every other typed refusal.
pub fn unauthenticated() -> tonic::Status {
    walden_proto::status::status(
        walden_common::ErrorCode::Unauthenticated,
        "a valid bearer token is required (authorization: Bearer TOKEN)".into(),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_listed_tokens_are_accepted_and_a_reload_replaces_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# ops\nalpha\n\n  beta  \n").unwrap();
        let t = Tokens::load(&path).unwrap();
        assert!(t.accepts(Some(b"Bearer alpha")));
        assert!(t.accepts(Some(b"Bearer beta")));
        for bad in [
            &b"Bearer gamma"[..],
            b"alpha",
            b"Bearer ",
            b"Bearer alph",
            b"bearer alpha",
        ] {
            assert!(!t.accepts(Some(bad)), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(!t.accepts(None));
        std::fs::write(&path, "gamma\n").unwrap();
        t.reload();
        assert!(t.accepts(Some(b"Bearer gamma")));
        assert!(
            !t.accepts(Some(b"Bearer alpha")),
            "a removed token still works"
        );
        // A broken file keeps the tokens in force.
        std::fs::write(&path, "\n# none\n").unwrap();
        t.reload();
        assert!(t.accepts(Some(b"Bearer gamma")));
        assert!(
            Tokens::load(&path).is_err(),
            "an empty token file locks everyone out"
        );
        assert!(Tokens::off().accepts(None));
    }

    #[test]
    fn milvus_clients_are_let_in_with_a_listed_token_as_a_token_or_a_password_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "alpha\n").unwrap();
        let t = Tokens::load(&path).unwrap();
        // base64 of "alpha", of "root:alpha", of "alpha:x", of "beta".
        assert!(t.accepts_milvus(Some(b"YWxwaGE=")));
        assert!(t.accepts_milvus(Some(b"cm9vdDphbHBoYQ==")));
        assert!(!t.accepts_milvus(Some(b"YWxwaGE6eA==")));
        assert!(!t.accepts_milvus(Some(b"YmV0YQ==")));
        assert!(!t.accepts_milvus(Some(b"Bearer alpha")), "not base64");
        assert!(!t.accepts_milvus(None));
        assert!(Tokens::off().accepts_milvus(None));
    }
}
