//! The migrated legacy UIDL map a `serve` session uses, and where it comes from.
//!
//! With `migration.shared_map = "metadata"` on a server that offers METADATA, METADATA is
//! authoritative: every login reads its head (one small GETMETADATA, pipelined with SELECT)
//! and uses the map that head names. The chunks are read only when the head differs from the
//! one cached in sled next to the map, so after a re-migration every instance serves the new
//! map at the next login, and a map deleted from METADATA is dropped from sled too. Without METADATA (the
//! server lacks it, or `shared_map = "none"`) sled is the only copy.
//!
//! Decoding and checking a large map (up to [`crate::uidl::map::MAX_MAP_BYTES`] of entry
//! text) runs on the blocking pool, and decoded maps are kept in a small bounded in-memory
//! cache keyed by maildrop and head, so a login usually decodes nothing.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::maildrop::MaildropKey;
use crate::state::StateStore;
use crate::uidl::map::{MapError, MapHead, UidlMap};
use crate::upstream::imap::conn::ImapConnection;
use crate::upstream::imap::metadata::{self, MetadataError};

/// Decoded maps kept in memory, at most ...
const CACHE_MAPS: usize = 256;
/// ... and at most this many octets of entry text in all (a decoded map takes a few times
/// its text, so this bounds the cache to some tens of MiB); a bigger map is decoded again
/// (off the runtime) at each login.
const CACHE_BYTES: usize = 16 << 20;

struct Cached {
    key: MaildropKey,
    head: MapHead,
    map: Arc<UidlMap>,
}

/// Decoded maps by maildrop and head, least recently used first out.
#[derive(Default)]
pub struct MapCache {
    maps: Mutex<VecDeque<Cached>>,
}

impl MapCache {
    fn get(&self, key: &MaildropKey, head: &MapHead) -> Option<Arc<UidlMap>> {
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        let at = maps.iter().position(|c| &c.key == key && &c.head == head)?;
        let hit = maps.remove(at)?;
        let map = Arc::clone(&hit.map);
        maps.push_back(hit);
        Some(map)
    }

    fn put(&self, key: &MaildropKey, head: &MapHead, map: &Arc<UidlMap>) {
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        maps.retain(|c| &c.key != key);
        if head.bytes > CACHE_BYTES {
            return;
        }
        maps.push_back(Cached {
            key: key.clone(),
            head: head.clone(),
            map: Arc::clone(map),
        });
        while maps.len() > CACHE_MAPS
            || maps.iter().map(|c| c.head.bytes).sum::<usize>() > CACHE_BYTES
        {
            maps.pop_front();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.maps.lock().unwrap().len()
    }
}

/// Where a session's map came from (the `popbridge_uidl_maps_total` outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Decoded earlier, or from sled.
    Cache,
    /// Read from METADATA.
    Metadata,
    /// A map for another UIDVALIDITY: ignored.
    Stale,
    /// There is no map.
    None,
}

/// What a session needs to find its map.
pub struct Lookup<'a> {
    pub state: Option<&'a Arc<StateStore>>,
    pub cache: &'a MapCache,
    pub key: &'a MaildropKey,
    /// The folder as configured (METADATA is read from it).
    pub mailbox: &'a str,
    pub uid_validity: u32,
    pub uid_next: Option<u32>,
}

fn decoding_failed(e: tokio::task::JoinError) -> MetadataError {
    MetadataError::Map(MapError::Malformed(format!("decoding failed: {e}")))
}

impl Lookup<'_> {
    /// The map in sled if its head is `head`, decoded off the runtime.
    async fn sled_map(&self, head: &MapHead) -> Result<Option<Arc<UidlMap>>, MetadataError> {
        let Some(state) = self.state else {
            return Ok(None);
        };
        let (state, key) = (Arc::clone(state), self.key.clone());
        let found = tokio::task::spawn_blocking(move || state.uidl_map(&key))
            .await
            .map_err(decoding_failed)?;
        Ok(match found {
            Some((h, map)) if &h == head => {
                let map = Arc::new(map);
                self.cache.put(self.key, head, &map);
                Some(map)
            }
            _ => None,
        })
    }

    /// The map for this folder's UIDVALIDITY. `shared` is `Some` when METADATA is read
    /// (configured and offered): the connection, and the head the login's GETMETADATA found
    /// (sent with SELECT, see [`metadata::head_command`]). An error there refuses the login.
    pub async fn load(
        &self,
        shared: Option<(&mut ImapConnection, Option<MapHead>)>,
    ) -> Result<(Option<Arc<UidlMap>>, Source), MetadataError> {
        let Some((conn, head)) = shared else {
            // sled is the only copy.
            let Some(head) = self.state.and_then(|s| s.uidl_map_head(self.key)) else {
                return Ok((None, Source::None));
            };
            if head.uid_validity != self.uid_validity {
                return Ok((None, Source::Stale));
            }
            if let Some(map) = self.cache.get(self.key, &head) {
                return Ok((Some(map), Source::Cache));
            }
            return Ok(match self.sled_map(&head).await? {
                Some(map) => (Some(map), Source::Cache),
                None => (None, Source::None),
            });
        };
        let Some(head) = head else {
            // METADATA has no map: neither has this user.
            if let Some(state) = self.state {
                if state.uidl_map_head(self.key).is_some() {
                    state.remove_uidl_map(self.key);
                }
            }
            return Ok((None, Source::None));
        };
        if head.uid_validity != self.uid_validity {
            return Ok((None, Source::Stale));
        }
        head.check_uid_next(self.uid_next)?;
        if let Some(map) = self.cache.get(self.key, &head) {
            return Ok((Some(map), Source::Cache));
        }
        let cached_head = self.state.and_then(|s| s.uidl_map_head(self.key));
        if cached_head.as_ref() == Some(&head) {
            if let Some(map) = self.sled_map(&head).await? {
                return Ok((Some(map), Source::Cache));
            }
        }
        let text = metadata::read_text(conn, self.mailbox, &head, self.uid_next).await?;
        let (state, key, h) = (self.state.cloned(), self.key.clone(), head.clone());
        let map = tokio::task::spawn_blocking(move || {
            let map = UidlMap::from_text(&h, &text)?;
            if let Some(state) = state {
                state.cache_uidl_map(&key, &h, &text);
            }
            Ok::<_, MapError>(map)
        })
        .await
        .map_err(decoding_failed)??;
        let map = Arc::new(map);
        self.cache.put(self.key, &head, &map);
        Ok((Some(map), Source::Metadata))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(uv: u32, n: u32) -> (MapHead, Arc<UidlMap>) {
        let mut m = UidlMap::new(uv);
        for uid in 1..=n {
            m.insert(uid, &format!("legacy.{uid}")).unwrap();
        }
        (m.to_local().unwrap().0, Arc::new(m))
    }

    #[test]
    fn the_cache_is_keyed_by_head_and_bounded() {
        let k = |u: &str| MaildropKey::new("imap:993", u, "INBOX");
        let c = MapCache::default();
        let (h1, m1) = map(1, 3);
        let (h2, m2) = map(1, 4);
        c.put(&k("u"), &h1, &m1);
        assert_eq!(c.get(&k("u"), &h1), Some(Arc::clone(&m1)));
        assert_eq!(c.get(&k("u"), &h2), None, "another head is another map");
        assert_eq!(c.get(&k("v"), &h1), None);
        c.put(&k("u"), &h2, &m2);
        assert_eq!(c.get(&k("u"), &h1), None, "replaced, not kept beside");
        assert_eq!(c.len(), 1);
        for i in 0..CACHE_MAPS + 10 {
            c.put(&k(&format!("user{i}")), &h1, &m1);
        }
        assert_eq!(c.len(), CACHE_MAPS);
        assert_eq!(c.get(&k("user0"), &h1), None, "oldest out first");
        let mut huge = h1.clone();
        huge.bytes = CACHE_BYTES + 1;
        c.put(&k("big"), &huge, &m1);
        assert_eq!(c.get(&k("big"), &huge), None, "too big to keep");
    }
}
