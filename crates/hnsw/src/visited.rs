/// A growable bitset of element ids seen by one search.
#[derive(Default, Clone)]
pub struct Visited {
    bits: Vec<u64>,
    count: usize,
}

impl Visited {
    pub fn with_capacity(n: usize) -> Self {
        Visited { bits: vec![0; n.div_ceil(64)], count: 0 }
    }

    /// Marks `id`; true when it was not marked before.
    #[inline]
    pub fn insert(&mut self, id: u32) -> bool {
        let (word, bit) = ((id / 64) as usize, id % 64);
        if word >= self.bits.len() {
            self.bits.resize((word + 1).next_power_of_two(), 0);
        }
        let mask = 1u64 << bit;
        let fresh = self.bits[word] & mask == 0;
        self.bits[word] |= mask;
        self.count += fresh as usize;
        fresh
    }

    pub fn contains(&self, id: u32) -> bool {
        let word = (id / 64) as usize;
        word < self.bits.len() && self.bits[word] & (1u64 << (id % 64)) != 0
    }

    /// How many distinct ids were marked.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}
