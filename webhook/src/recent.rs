//! A few recent results of a pure function, remembered by input. Pods come in bursts of
//! replicas with the same annotations, and a webhook has one config: the expensive pieces of a
//! review (parsing an annotation, rendering the sidecar) repeat with the same inputs.

use std::convert::Infallible;
use std::sync::Mutex;

/// Up to `capacity` (input, output) pairs, the oldest forgotten first.
#[derive(Debug)]
pub struct Recent<K, V> {
    capacity: usize,
    entries: Mutex<Vec<(K, V)>>,
}

impl<K, V> Recent<K, V> {
    pub const fn new(capacity: usize) -> Self {
        Recent {
            capacity,
            entries: Mutex::new(Vec::new()),
        }
    }
}

impl<K: PartialEq, V: Clone> Recent<K, V> {
    /// The remembered output for an input `matches` accepts, or `make`'s, remembered under
    /// `key()` when it succeeds. Failures are not remembered: they are rare, and their errors
    /// need not be cloneable.
    pub fn get_or_try<E>(
        &self,
        matches: impl Fn(&K) -> bool,
        key: impl FnOnce() -> K,
        make: impl FnOnce() -> Result<V, E>,
    ) -> Result<V, E> {
        if let Some(found) = self.find(&matches) {
            return Ok(found);
        }
        let made = make()?;
        self.remember(key(), made.clone(), |seen, _| matches(seen));
        Ok(made)
    }

    /// [`Recent::get_or_try`] for an input the caller owns and has no more use for: it is the
    /// key itself, so a new one is remembered without a copy. `same` tells a remembered input
    /// from `input`.
    pub fn get_or_try_owned<E>(
        &self,
        input: K,
        same: impl Fn(&K, &K) -> bool,
        make: impl FnOnce(&K) -> Result<V, E>,
    ) -> Result<V, E> {
        if let Some(found) = self.find(|seen| same(seen, &input)) {
            return Ok(found);
        }
        let made = make(&input)?;
        self.remember(input, made.clone(), same);
        Ok(made)
    }

    /// The first of `f`'s answers for the remembered entries, newest last.
    pub fn find_map<R>(&self, f: impl Fn(&K, &V) -> Option<R>) -> Option<R> {
        self.lock().iter().find_map(|(k, v)| f(k, v))
    }

    fn find(&self, matches: impl Fn(&K) -> bool) -> Option<V> {
        let entries = self.lock();
        entries
            .iter()
            .find(|(k, _)| matches(k))
            .map(|(_, v)| v.clone())
    }

    /// Remembers `value` under `key`, unless another caller made it meanwhile (made without
    /// the lock held, a slow input does not hold up the others), forgetting the oldest when
    /// full.
    pub fn remember(&self, key: K, value: V, same: impl Fn(&K, &K) -> bool) {
        let mut entries = self.lock();
        if entries.iter().any(|(k, _)| same(k, &key)) {
            return;
        }
        if entries.len() >= self.capacity {
            entries.remove(0);
        }
        entries.push((key, value));
    }

    /// [`Recent::get_or_try`] for a `make` that cannot fail.
    pub fn get_or(
        &self,
        matches: impl Fn(&K) -> bool,
        key: impl FnOnce() -> K,
        make: impl FnOnce() -> V,
    ) -> V {
        let Ok(value) = self.get_or_try::<Infallible>(matches, key, || Ok(make()));
        value
    }

    /// [`Recent::get_or_try_owned`] for a `make` that cannot fail.
    pub fn get_or_owned(
        &self,
        input: K,
        same: impl Fn(&K, &K) -> bool,
        make: impl FnOnce(&K) -> V,
    ) -> V {
        let Ok(value) = self.get_or_try_owned::<Infallible>(input, same, |input| Ok(make(input)));
        value
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(K, V)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn remembers_successes_up_to_capacity_and_forgets_the_oldest() {
        let recent: Recent<u32, u32> = Recent::new(2);
        let calls = Cell::new(0);
        let square = |n: u32| {
            recent.get_or_try(
                |k| *k == n,
                || n,
                || {
                    calls.set(calls.get() + 1);
                    Ok::<_, ()>(n * n)
                },
            )
        };
        assert_eq!(square(3), Ok(9));
        assert_eq!(square(3), Ok(9));
        assert_eq!(calls.get(), 1, "the second call is remembered");
        assert_eq!(square(4), Ok(16));
        assert_eq!(square(5), Ok(25));
        assert_eq!(calls.get(), 3);
        assert_eq!(square(3), Ok(9), "3 was the oldest and is made again");
        assert_eq!(calls.get(), 4);
        assert_eq!(square(5), Ok(25));
        assert_eq!(calls.get(), 4, "5 is still remembered");
    }

    #[test]
    fn an_owned_input_is_remembered_as_its_own_key() {
        let recent: Recent<String, usize> = Recent::new(2);
        let calls = Cell::new(0);
        let length = |text: &str| {
            recent.get_or_try_owned(
                text.to_string(),
                |a, b| a == b,
                |input| {
                    calls.set(calls.get() + 1);
                    Ok::<_, ()>(input.len())
                },
            )
        };
        assert_eq!(length("abc"), Ok(3));
        assert_eq!(length("abc"), Ok(3));
        assert_eq!(calls.get(), 1, "the second call is remembered");
        assert_eq!(length("de"), Ok(2));
        assert_eq!(length("f"), Ok(1));
        assert_eq!(calls.get(), 3);
        assert_eq!(length("abc"), Ok(3), "abc was the oldest and is made again");
        assert_eq!(calls.get(), 4);
        assert_eq!(length("f"), Ok(1));
        assert_eq!(calls.get(), 4, "f is still remembered");
        let failing = recent.get_or_try_owned("g".to_string(), |a, b| a == b, |_| Err("no"));
        assert_eq!(failing, Err("no"));
        assert_eq!(length("f"), Ok(1), "a failure forgets nothing");
        assert_eq!(calls.get(), 4);
    }

    #[test]
    fn failures_are_not_remembered() {
        let recent: Recent<u32, u32> = Recent::new(2);
        let calls = Cell::new(0);
        let fail = || {
            recent.get_or_try(
                |k| *k == 1,
                || 1,
                || {
                    calls.set(calls.get() + 1);
                    Err::<u32, _>("no")
                },
            )
        };
        assert_eq!(fail(), Err("no"));
        assert_eq!(fail(), Err("no"));
        assert_eq!(calls.get(), 2);
    }
}
