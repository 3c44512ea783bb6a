//! Private loopback addresses for test servers that cannot report the port they bound (etcd,
//! SeaweedFS, Redis): each gets an address of its own in 127.0.0.0/8 and listens on its usual
//! fixed ports there.
//!
//! A port found by binding and releasing it can be taken by anyone before the server binds it.
//! An address no one else uses cannot: Linux routes all of 127.0.0.0/8 to the loopback device,
//! the rest of the suite binds 127.0.0.1 only, and an address is claimed with an exclusive lock
//! on a file under the temporary directory, held as long as the [`TestHost`] lives (and dropped
//! by the kernel if the process dies), so concurrent tests and test processes never share one.

use std::{
    fs::{File, TryLockError},
    io,
    path::PathBuf,
};

/// The first address handed out is `127.77.0.1`; then `127.77.0.2`, and so on.
const PREFIX: &str = "127.77";

/// A loopback address held for one test server.
#[derive(Debug)]
pub struct TestHost {
    ip: String,
    index: u16,
    _lock: File,
}

impl TestHost {
    /// Claims the first free address.
    pub fn claim() -> io::Result<Self> {
        let dir = lock_dir();
        std::fs::create_dir_all(&dir)?;
        for (index, (hi, lo)) in (0..=255u8)
            .flat_map(|hi| (1..=254u8).map(move |lo| (hi, lo)))
            .enumerate()
        {
            let ip = format!("{PREFIX}.{hi}.{lo}");
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("{ip}.lock")))?;
            match file.try_lock() {
                Ok(()) => {
                    let index = u16::try_from(index).unwrap_or(u16::MAX);
                    return Ok(Self {
                        ip,
                        index,
                        _lock: file,
                    });
                }
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(e)) => return Err(e),
            }
        }
        Err(io::Error::other(format!(
            "every test address in {PREFIX}.0.0/16 is held (locks in {})",
            dir.display()
        )))
    }

    /// Which address this is: 0 for the first (`127.77.0.1`), and so on. Live hosts have
    /// distinct indexes; a server whose files are named by port (SeaweedFS's sockets under
    /// `/tmp`) can shift its ports by it.
    #[must_use]
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The address, as `127.77.x.y`.
    #[must_use]
    pub fn ip(&self) -> &str {
        &self.ip
    }
}

fn lock_dir() -> PathBuf {
    std::env::temp_dir().join("walden-test-hosts")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn two_live_hosts_never_share_an_address_and_a_dropped_one_is_free_again() {
        let a = TestHost::claim().unwrap();
        let b = TestHost::claim().unwrap();
        assert_ne!(a.ip(), b.ip());
        assert!(a.ip().starts_with("127.77."), "{}", a.ip());
        // The address is routable at once, with no set-up.
        let l = std::net::TcpListener::bind((a.ip(), 0)).unwrap();
        std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let held = lock_dir().join(format!("{}.lock", a.ip()));
        let other = File::options().write(true).open(&held).unwrap();
        assert!(matches!(other.try_lock(), Err(TryLockError::WouldBlock)));
        drop(a);
        other.try_lock().unwrap();
    }
}
