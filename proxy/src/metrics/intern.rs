//! Interned label values: each distinct string is stored once, for the process's life, and a
//! label is a pointer to it.
//!
//! The request path builds a series key from label values on every request. With interned
//! values the key is a handful of pointers and small integers: cheap to hash and compare, and
//! `Copy`, so building it neither allocates nor touches a reference count. Strings are interned
//! when a config compiles (endpoint workloads, services, principals) and, for the few values
//! that arrive with a request (the caller's workload from the peer header, the route name), by
//! a lock-free lookup; only a string never seen before takes the interner's lock.
//!
//! Interned strings are leaked on purpose (they are referenced by series that live as long as
//! the process anyway) and bounded: past [`MAX_SYMBOLS`] distinct values, new ones intern as
//! `unknown`, so a caller inventing header values cannot grow memory or cardinality without
//! limit.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

/// Most distinct label values the process keeps; past it, new values are `unknown`.
pub const MAX_SYMBOLS: usize = 16_384;

/// Longest label value kept; a longer one is `unknown` (Kubernetes names are at most 253
/// characters, a SPIFFE ID of them a little more).
pub const MAX_SYMBOL_LEN: usize = 512;

/// An interned label value. Two symbols are equal exactly when they are the same string,
/// compared by address.
#[derive(Clone, Copy, Debug)]
pub struct Sym(&'static str);

// Statics, not constants: a constant's string may be a different copy at each use, and
// symbols compare by address.
static UNKNOWN: Sym = Sym("unknown");
static EMPTY: Sym = Sym("");

impl Sym {
    /// `unknown`: what Istio writes for a label it cannot fill (Kiali skips series that lack
    /// one, so a label is never left out).
    pub fn unknown() -> Sym {
        UNKNOWN
    }

    /// The empty value (Istio's `grpc_response_status` of a request that is not gRPC).
    pub fn empty() -> Sym {
        EMPTY
    }

    /// The value.
    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl PartialEq for Sym {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl Eq for Sym {}

impl Hash for Sym {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_usize(self.0.as_ptr() as usize);
    }
}

type Table = HashMap<&'static str, Sym, foldhash::fast::RandomState>;

/// The set of interned strings.
#[derive(Debug)]
pub struct Interner {
    table: ArcSwap<Table>,
    /// Taken only to add a string never seen before; never on the path of a known one.
    adding: Mutex<()>,
}

impl Default for Interner {
    fn default() -> Self {
        let mut table = Table::default();
        // The constants are the interned values of their strings, so `intern("unknown")` is
        // `Sym::unknown()`.
        for sym in [UNKNOWN, EMPTY] {
            table.insert(sym.0, sym);
        }
        Self {
            table: ArcSwap::from_pointee(table),
            adding: Mutex::new(()),
        }
    }
}

impl Interner {
    /// The symbol of `value`; `unknown` when the value is empty, too long, or the interner is
    /// full. Lock-free when the value is known.
    pub fn intern(&self, value: &str) -> Sym {
        if value.is_empty() {
            return Sym::unknown();
        }
        if let Some(sym) = self.table.load().get(value) {
            return *sym;
        }
        if value.len() > MAX_SYMBOL_LEN {
            return Sym::unknown();
        }
        self.add(value)
    }

    /// The symbol of `value`, empty strings included (`grpc_response_status=""`).
    pub fn intern_or_empty(&self, value: &str) -> Sym {
        if value.is_empty() {
            Sym::empty()
        } else {
            self.intern(value)
        }
    }

    fn add(&self, value: &str) -> Sym {
        let _adding = self
            .adding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = self.table.load_full();
        if let Some(sym) = current.get(value) {
            return *sym; // added while this thread waited
        }
        if current.len() >= MAX_SYMBOLS {
            return Sym::unknown();
        }
        let leaked: &'static str = Box::leak(value.to_owned().into_boxed_str());
        let sym = Sym(leaked);
        let mut next = Table::clone(&current);
        next.insert(leaked, sym);
        self.table.store(Arc::new(next));
        sym
    }

    /// How many strings are interned.
    pub fn len(&self) -> usize {
        self.table.load().len()
    }

    /// Whether only the built-in values are interned.
    pub fn is_empty(&self) -> bool {
        self.len() <= 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_string_is_one_symbol_and_equal_strings_are_equal_symbols() {
        let i = Interner::default();
        let a = i.intern("reviews-v1");
        let b = i.intern(&String::from("reviews-v1"));
        assert_eq!(a, b);
        assert!(std::ptr::eq(a.as_str(), b.as_str()));
        assert_ne!(a, i.intern("reviews-v2"));
        assert_eq!(i.intern("unknown"), Sym::unknown());
        assert_eq!(i.intern(""), Sym::unknown());
        assert_eq!(i.intern_or_empty(""), Sym::empty());
    }

    #[test]
    fn values_past_the_bounds_are_unknown() {
        let i = Interner::default();
        assert_eq!(i.intern(&"x".repeat(MAX_SYMBOL_LEN + 1)), Sym::unknown());
        for n in 0..MAX_SYMBOLS {
            i.intern(&format!("w{n}"));
        }
        assert_eq!(i.len(), MAX_SYMBOLS);
        assert_eq!(i.intern("one-too-many"), Sym::unknown());
        // Known values still resolve.
        assert_eq!(i.intern("w7").as_str(), "w7");
    }
}
