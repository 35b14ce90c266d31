use crate::Id;

const EMPTY: Id = Id::MAX;

/// The set of element ids one search has seen: open addressing with linear probing, sized to
/// stay under half full. Ids are dense in memory and packed (block, offset) pairs on pages,
/// so a bitmap would not do for both.
#[derive(Clone)]
pub struct Visited {
    slots: Vec<Id>,
    count: usize,
}

impl Default for Visited {
    fn default() -> Self {
        Visited::with_capacity(256)
    }
}

impl Visited {
    pub fn with_capacity(n: usize) -> Self {
        Visited { slots: vec![EMPTY; (2 * n).next_power_of_two().max(16)], count: 0 }
    }

    #[inline]
    fn slot(&self, id: Id) -> usize {
        // Fibonacci hashing: the high bits of a multiplicative hash.
        let h = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (h >> (64 - self.slots.len().trailing_zeros())) as usize
    }

    /// Marks `id`; true when it was not marked before.
    #[inline]
    pub fn insert(&mut self, id: Id) -> bool {
        debug_assert_ne!(id, EMPTY);
        if 2 * (self.count + 1) > self.slots.len() {
            self.grow();
        }
        let mask = self.slots.len() - 1;
        let mut i = self.slot(id);
        loop {
            let s = self.slots[i];
            if s == id {
                return false;
            }
            if s == EMPTY {
                self.slots[i] = id;
                self.count += 1;
                return true;
            }
            i = (i + 1) & mask;
        }
    }

    pub fn contains(&self, id: Id) -> bool {
        let mask = self.slots.len() - 1;
        let mut i = self.slot(id);
        loop {
            match self.slots[i] {
                s if s == id => return true,
                EMPTY => return false,
                _ => i = (i + 1) & mask,
            }
        }
    }

    fn grow(&mut self) {
        let bigger = vec![EMPTY; self.slots.len() * 2];
        let old = std::mem::replace(&mut self.slots, bigger);
        self.count = 0;
        for id in old.into_iter().filter(|&s| s != EMPTY) {
            self.insert(id);
        }
    }

    /// How many distinct ids were marked.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_set() {
        let mut v = Visited::with_capacity(4);
        let mut reference = std::collections::HashSet::new();
        let mut x = 12345u64;
        for _ in 0..20000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let id = (x >> 40) << 16 | (x & 0xff);
            assert_eq!(v.insert(id), reference.insert(id));
        }
        assert_eq!(v.len(), reference.len());
        assert!(reference.iter().all(|&id| v.contains(id)));
        assert!(!v.contains(u64::MAX - 1));
    }
}
