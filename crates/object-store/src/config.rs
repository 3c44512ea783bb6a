//! The object-store config: `[object_store]` in the server's TOML file. Every key is optional;
//! the defaults are written next to each field and in `walden.example.toml`.

use std::time::Duration;

use serde::Deserialize;

/// Where objects live and how to reach them.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectStoreConfig {
    /// `file:///abs/dir` (a directory that exists), `memory://` (this process only, for
    /// tests) or `s3://bucket/optional/prefix`. Default empty: the server uses
    /// `file://<server.data_dir>/objects`.
    pub url: String,
    /// An S3-compatible endpoint (`http://127.0.0.1:8333`); empty: AWS itself (or
    /// `AWS_ENDPOINT_URL`). Default empty.
    pub endpoint: String,
    /// Default `us-east-1` (or `AWS_REGION`/`AWS_DEFAULT_REGION` when set).
    pub region: String,
    /// Empty: `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`, else anonymous. Default empty.
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Allow `http://` endpoints. Default false.
    pub allow_http: bool,
    /// One request's time limit. Default 30 000 ms.
    pub request_timeout_ms: u64,
    /// Retries of a request that failed transiently (connection errors, 5xx, throttling),
    /// with exponential backoff from `retry_backoff_ms`, at most `retry_max_ms` in all.
    /// Defaults 5, 100 ms and 30 000 ms.
    pub max_retries: usize,
    pub retry_backoff_ms: u64,
    pub retry_max_ms: u64,
}

impl Default for ObjectStoreConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            endpoint: String::new(),
            region: String::new(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            allow_http: false,
            request_timeout_ms: 30_000,
            max_retries: 5,
            retry_backoff_ms: 100,
            retry_max_ms: 30_000,
        }
    }
}

/// The parsed `url`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A local directory (absolute).
    File(std::path::PathBuf),
    Memory,
    /// A bucket, and a prefix inside it (no leading or trailing `/`; may be empty).
    S3 {
        bucket: String,
        prefix: String,
    },
}

impl ObjectStoreConfig {
    /// The location `url` names, or why it names none.
    pub fn location(&self) -> Result<Location, String> {
        let url = self.url.trim();
        if let Some(path) = url.strip_prefix("file://") {
            let path = std::path::PathBuf::from(path);
            if !path.is_absolute() {
                return Err(format!(
                    "object_store.url {url:?}: a file:// URL needs an absolute path (file:///dir)"
                ));
            }
            return Ok(Location::File(path));
        }
        if url == "memory://" || url == "memory:///" {
            return Ok(Location::Memory);
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!(
                    "object_store.url {url:?}: no bucket (s3://bucket/prefix)"
                ));
            }
            return Ok(Location::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
            });
        }
        Err(format!(
            "object_store.url {url:?}: use file:///abs/dir, memory:// or s3://bucket/prefix"
        ))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Checks what can be checked without reaching the store.
    pub fn validate(&self) -> Result<(), String> {
        let location = self.location()?;
        if self.request_timeout_ms == 0 {
            return Err("object_store.request_timeout_ms must be at least 1".into());
        }
        if self.access_key_id.is_empty() != self.secret_access_key.is_empty() {
            return Err(
                "object_store.access_key_id and object_store.secret_access_key are set together"
                    .into(),
            );
        }
        if !self.endpoint.is_empty() {
            if !matches!(location, Location::S3 { .. }) {
                return Err("object_store.endpoint is only for s3:// URLs".into());
            }
            if self.endpoint.starts_with("http://") && !self.allow_http {
                return Err(format!(
                    "object_store.endpoint {:?} is http://: set object_store.allow_http = true",
                    self.endpoint
                ));
            }
            if !self.endpoint.starts_with("http://") && !self.endpoint.starts_with("https://") {
                return Err(format!(
                    "object_store.endpoint {:?} must start with http:// or https://",
                    self.endpoint
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_parse_into_locations_and_bad_ones_name_the_key() {
        let c = |url: &str| ObjectStoreConfig {
            url: url.into(),
            ..ObjectStoreConfig::default()
        };
        assert_eq!(c("memory://").location(), Ok(Location::Memory));
        assert_eq!(
            c("file:///var/walden").location(),
            Ok(Location::File("/var/walden".into()))
        );
        assert_eq!(
            c("s3://b/wal/node-1/").location(),
            Ok(Location::S3 {
                bucket: "b".into(),
                prefix: "wal/node-1".into()
            })
        );
        for bad in ["file://rel/dir", "s3://", "gs://b", "/abs"] {
            let e = c(bad).location().unwrap_err();
            assert!(e.starts_with("object_store.url"), "{e}");
        }
        let mut http = c("s3://b");
        http.endpoint = "http://127.0.0.1:8333".into();
        assert!(http.validate().unwrap_err().contains("allow_http"));
        http.allow_http = true;
        assert!(http.validate().is_ok());
        http.access_key_id = "k".into();
        assert!(http.validate().unwrap_err().contains("secret_access_key"));
    }
}
