//! A Linux network namespace for partition tests (root and `ip`, as CI has them): a veth pair
//! between the host and the namespace, on addresses of this test only. The host side holds
//! two addresses: `host` (the link the namespace shares with everyone) and `etcd` (where etcd
//! listens, reached from the namespace through a route of its own), so the namespace can be
//! cut from etcd alone (the route goes) or from everything (the link goes down).

use std::process::Command;

pub struct Netns {
    pub name: String,
    veth: String,
    /// The host's address on the link (coordinators, other nodes and clients listen here).
    pub host: String,
    /// The host's address etcd listens on.
    pub etcd: String,
    /// The namespace's address.
    pub inside: String,
    etcd_net: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// Makes the namespace and its link; `Err` says why it cannot be made here.
    pub fn create() -> Result<Self, String> {
        let n = std::process::id() % 200 + 20;
        let s = Self {
            name: format!("wdn{n}"),
            veth: format!("wdv{n}"),
            host: format!("10.231.{n}.1"),
            etcd: format!("10.232.{n}.1"),
            inside: format!("10.231.{n}.2"),
            etcd_net: format!("10.232.{n}.0/24"),
        };
        // Leftovers of an earlier run with the same number.
        let _ = ip(&["link", "del", &s.veth]);
        let _ = ip(&["netns", "del", &s.name]);
        let peer = format!("{}p", s.veth);
        ip(&["netns", "add", &s.name])?;
        let made = (|| {
            ip(&[
                "link", "add", &s.veth, "type", "veth", "peer", "name", &peer,
            ])?;
            ip(&["link", "set", &peer, "netns", &s.name])?;
            ip(&["addr", "add", &format!("{}/24", s.host), "dev", &s.veth])?;
            ip(&["addr", "add", &format!("{}/24", s.etcd), "dev", &s.veth])?;
            ip(&["link", "set", &s.veth, "up"])?;
            s.exec(&[
                "ip",
                "addr",
                "add",
                &format!("{}/24", s.inside),
                "dev",
                &peer,
            ])?;
            s.exec(&["ip", "link", "set", &peer, "up"])?;
            s.exec(&["ip", "link", "set", "lo", "up"])?;
            s.exec(&["ip", "route", "add", &s.etcd_net, "via", &s.host])
        })();
        made.map(|()| s)
    }

    fn exec(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// The namespace loses its way to etcd (and only that).
    pub fn cut_etcd(&self) {
        self.exec(&["ip", "route", "del", &self.etcd_net])
            .expect("cut the route to etcd");
    }

    /// The namespace reaches etcd again.
    pub fn heal_etcd(&self) {
        self.exec(&["ip", "route", "add", &self.etcd_net, "via", &self.host])
            .expect("restore the route to etcd");
    }

    /// The namespace is cut from everything (its link goes down).
    pub fn cut_all(&self) {
        ip(&["link", "set", &self.veth, "down"]).expect("link down");
    }

    /// The link comes back (with the route to etcd).
    pub fn heal_all(&self) {
        ip(&["link", "set", &self.veth, "up"]).expect("link up");
        let _ = self.exec(&["ip", "route", "add", &self.etcd_net, "via", &self.host]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.veth]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
