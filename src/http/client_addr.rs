//! Who a client is, by address, and how many sockets each address holds.
//!
//! The address is the socket peer, unless the peer is a trusted proxy: then
//! it is the nearest `X-Forwarded-For` hop that is not itself trusted, read
//! from the right, so a client cannot dodge the cap by forging the header.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use ipnet::IpNet;

#[derive(Clone, Default)]
pub struct ClientAddrs {
    trusted: Arc<Vec<IpNet>>,
    max_per_addr: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One open socket counted against an address; released on drop.
pub struct ConnectionSlot {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    addr: IpAddr,
}

impl ClientAddrs {
    pub fn new(trusted: Vec<IpNet>, max_per_addr: usize) -> Self {
        Self {
            trusted: Arc::new(trusted),
            max_per_addr,
            open: Default::default(),
        }
    }

    pub fn resolve(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.ip().to_canonical();
        if !self.is_trusted(peer) {
            return peer;
        }
        let hops: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|hop| hop.trim().parse::<IpAddr>().ok())
            .collect();
        hops.into_iter()
            .rev()
            .map(|ip| ip.to_canonical())
            .find(|ip| !self.is_trusted(*ip))
            .unwrap_or(peer)
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// Takes a slot for `addr`, or `None` when it already holds the maximum.
    pub fn acquire(&self, addr: IpAddr) -> Option<ConnectionSlot> {
        let mut open = self.open.lock().expect("addr lock");
        let count = open.entry(addr).or_default();
        if *count >= self.max_per_addr {
            return None;
        }
        *count += 1;
        Some(ConnectionSlot {
            open: self.open.clone(),
            addr,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("addr lock");
        if let Some(count) = open.get_mut(&self.addr) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let addrs = ClientAddrs::new(vec!["10.0.0.0/8".parse().unwrap()], 2);
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "6.6.6.6, 1.2.3.4, 10.0.0.2".parse().unwrap(),
        );
        let proxy: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let direct: SocketAddr = "9.9.9.9:5000".parse().unwrap();
        assert_eq!(
            addrs.resolve(proxy, &headers),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            addrs.resolve(direct, &headers),
            "9.9.9.9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn cap_counts_open_slots() {
        let addrs = ClientAddrs::new(vec![], 2);
        let ip: IpAddr = "1.2.3.4".parse().unwrap();
        let a = addrs.acquire(ip).unwrap();
        let _b = addrs.acquire(ip).unwrap();
        assert!(addrs.acquire(ip).is_none());
        drop(a);
        assert!(addrs.acquire(ip).is_some());
    }
}
