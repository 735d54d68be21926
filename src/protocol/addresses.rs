//! The documents one Hocuspocus socket names, by address.
//!
//! A sorted list rather than a hash map: most sockets name one document, and
//! a hash map's smallest table has room for four (180 bytes for one entry),
//! a cost every idle socket would carry. Lookups are a binary search; an
//! insert shifts the entries after it, which happens once per authentication
//! and is bounded by the socket's document limit.

use std::sync::Arc;

pub struct ByAddress<V> {
    entries: Vec<(Arc<str>, V)>,
}

impl<V> ByAddress<V> {
    pub fn new() -> Self {
        Self {
            entries: Vec::new(),
        }
    }

    fn find(&self, address: &str) -> Result<usize, usize> {
        self.entries.binary_search_by(|(a, _)| (**a).cmp(address))
    }

    pub fn get(&self, address: &str) -> Option<&V> {
        let i = self.find(address).ok()?;
        Some(&self.entries[i].1)
    }

    pub fn get_mut(&mut self, address: &str) -> Option<&mut V> {
        let i = self.find(address).ok()?;
        Some(&mut self.entries[i].1)
    }

    /// The address as the list holds it, to share rather than copy.
    pub fn key(&self, address: &str) -> Option<&Arc<str>> {
        let i = self.find(address).ok()?;
        Some(&self.entries[i].0)
    }

    pub fn contains_key(&self, address: &str) -> bool {
        self.find(address).is_ok()
    }

    /// Sets the value for `address`; returns the one it replaces.
    pub fn insert(&mut self, address: Arc<str>, value: V) -> Option<V> {
        match self.find(&address) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                // A vector's first growth makes room for four: the usual one
                // document should cost one entry.
                if self.entries.len() < 4 {
                    self.entries.reserve_exact(1);
                }
                self.entries.insert(i, (address, value));
                None
            }
        }
    }

    pub fn remove(&mut self, address: &str) -> Option<V> {
        let i = self.find(address).ok()?;
        Some(self.entries.remove(i).1)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &V)> {
        self.entries.iter().map(|(a, v)| (a, v))
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }

    pub fn into_values(self) -> impl Iterator<Item = V> {
        self.entries.into_iter().map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn behaves_as_a_map() {
        let mut map = ByAddress::new();
        let mut model = HashMap::new();
        // A fixed shuffle of inserts, replacements and removals.
        for step in 0..400u32 {
            let address = format!("doc-{}", (step * 37) % 23);
            match step % 3 {
                0 | 1 => assert_eq!(
                    map.insert(address.as_str().into(), step),
                    model.insert(address.clone(), step)
                ),
                _ => assert_eq!(map.remove(&address), model.remove(&address)),
            }
            assert_eq!(map.len(), model.len());
            assert_eq!(map.get(&address), model.get(&address));
            assert_eq!(map.contains_key(&address), model.contains_key(&address));
        }
        let mut entries: Vec<_> = map.iter().map(|(a, v)| (a.to_string(), *v)).collect();
        let mut expected: Vec<_> = model.into_iter().collect();
        entries.sort();
        expected.sort();
        assert_eq!(entries, expected);
    }

    #[test]
    fn one_entry_takes_room_for_one() {
        let mut map = ByAddress::new();
        map.insert("a".into(), 1u8);
        assert_eq!(map.entries.capacity(), 1);
        *map.get_mut("a").unwrap() = 2;
        assert_eq!(map.into_values().collect::<Vec<_>>(), [2]);
    }
}
