//! Counters indexed by their labels: an array with one slot per label value, reached by the
//! value itself (an `enum-map`, written out). A count is then one array access and one atomic
//! add: no index arithmetic, hashing or allocation on the paths that count.

use std::marker::PhantomData;
use std::ops::Index;

/// A closed set of label values, each with a slot of its own.
pub(super) trait Key: Copy + 'static {
    /// Every value, in slot order (the order `/metrics` lists them in).
    const VALUES: &'static [Self];

    /// This value's slot: its position in [`Key::VALUES`].
    fn slot(self) -> usize;
}

/// One `V` per value of `K`. `N` is the number of values, checked when the map is built.
pub(super) struct PerKey<K, V, const N: usize> {
    slots: [V; N],
    keys: PhantomData<fn() -> K>,
}

impl<K: Key, V, const N: usize> PerKey<K, V, N> {
    /// Fails the build where `N` is not the number of keys.
    const SIZED: () = assert!(N == K::VALUES.len(), "one slot per key");

    /// Every key with its value, in slot order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (K, &V)> {
        K::VALUES.iter().copied().zip(&self.slots)
    }

    /// Every value, in slot order.
    pub(super) fn values(&self) -> impl Iterator<Item = &V> {
        self.slots.iter()
    }
}

impl<K: Key, V: Default, const N: usize> Default for PerKey<K, V, N> {
    fn default() -> Self {
        let () = Self::SIZED;
        PerKey {
            slots: std::array::from_fn(|_| V::default()),
            keys: PhantomData,
        }
    }
}

impl<K: Key, V, const N: usize> Index<K> for PerKey<K, V, N> {
    type Output = V;

    fn index(&self, key: K) -> &V {
        &self.slots[key.slot()]
    }
}

impl<K, V: std::fmt::Debug, const N: usize> std::fmt::Debug for PerKey<K, V, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.slots).finish()
    }
}

/// Whether every value of `K` sits in the slot its position in [`Key::VALUES`] names (for the
/// tests of each key type).
#[cfg(test)]
pub(super) fn slots_agree<K: Key>() -> bool {
    K::VALUES.iter().enumerate().all(|(i, k)| k.slot() == i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Colour {
        Red,
        Green,
    }

    impl Key for Colour {
        const VALUES: &'static [Self] = &[Colour::Red, Colour::Green];
        fn slot(self) -> usize {
            self as usize
        }
    }

    #[test]
    fn each_key_reaches_its_own_slot() {
        assert!(slots_agree::<Colour>());
        let mut map: PerKey<Colour, u32, 2> = PerKey::default();
        map.slots[1] = 7;
        assert_eq!((map[Colour::Red], map[Colour::Green]), (0, 7));
        let listed: Vec<_> = map.iter().map(|(k, v)| (k, *v)).collect();
        assert_eq!(listed, [(Colour::Red, 0), (Colour::Green, 7)]);
    }
}
