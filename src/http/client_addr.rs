//! Who a client is, by address, and how many sockets each address holds.
//!
//! The address is the socket peer, unless the peer is a trusted proxy: then
//! it is the nearest `X-Forwarded-For` hop that is not itself trusted, read
//! from the right, so a client cannot dodge the cap by forging the header.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};

use axum::http::HeaderMap;
use ipnet::IpNet;

#[derive(Clone, Default)]
pub struct ClientAddrs {
    trusted: Arc<Vec<IpNet>>,
    max_per_addr: usize,
    open: Arc<Open>,
}

/// The addresses holding sockets, each with what its slots share.
type Open = Mutex<HashMap<IpAddr, Weak<Address>>>;

/// One open socket counted against an address; released on drop. The
/// sockets of one address share its count, so a slot is one pointer: it is
/// held for a socket's whole life, in the task every idle socket carries.
pub struct ConnectionSlot {
    _address: Arc<Address>,
}

/// An address with open sockets; they are its slots, counted by the `Arc`.
struct Address {
    addr: IpAddr,
    open: Arc<Open>,
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
        if let Some(address) = open.get(&addr).and_then(Weak::upgrade) {
            // The open slots, less the handle just made.
            return (Arc::strong_count(&address) - 1 < self.max_per_addr)
                .then_some(ConnectionSlot { _address: address });
        }
        if self.max_per_addr == 0 {
            return None;
        }
        let address = Arc::new(Address {
            addr,
            open: self.open.clone(),
        });
        open.insert(addr, Arc::downgrade(&address));
        Some(ConnectionSlot { _address: address })
    }
}

impl Drop for Address {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("addr lock");
        // Unless a new socket from the address replaced it meanwhile.
        if open.get(&self.addr).is_some_and(|a| a.strong_count() == 0) {
            open.remove(&self.addr);
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
        let c = addrs.acquire(ip).unwrap();
        assert!(addrs.acquire(ip).is_none());
        drop((c, _b));
        assert!(
            addrs.open.lock().unwrap().is_empty(),
            "an address with no sockets is forgotten"
        );
        let _d = addrs.acquire(ip).unwrap();
        assert_eq!(addrs.open.lock().unwrap().len(), 1);
        assert!(ClientAddrs::new(vec![], 0).acquire(ip).is_none());
    }
}
