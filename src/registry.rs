//! The functions that run now, by name, and the routing table read for
//! every message.
//!
//! A function is an [`Arc`] of an immutable [`Deployed`] version: its
//! name, version, triggers and pool of warm instances. The [`Registry`]
//! holds an immutable [`Table`] (the versions and a router over their
//! triggers) behind an atomic pointer: a change builds a new table and
//! swaps it in, and a reader takes the current one per message, without a
//! lock. A message routed to a version keeps an `Arc` of it, so it
//! finishes on that version whatever is swapped in meanwhile; a replaced
//! version's pool stops when its last message is done and the last
//! reference goes (its queue closes; its workers finish what is queued and
//! exit).
//!
//! The functions of the configuration file and deployed ones go through
//! the same [`Registry::install`]. Every change of the set of trigger
//! filters is published on a [`watch`] channel, which ingest from an
//! external broker follows to subscribe and unsubscribe.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::route::{Router, TopicFilter};
use crate::runtime::pool::{FunctionMetrics, Pool};
use crate::runtime::{FunctionSpec, FunctionState, RefusedCalls};
use crate::schedule::Schedule;
use crate::state::Entries;

/// Where a function comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A `[[functions]]` table of the configuration file.
    Config,
    /// A bundle deployed over MQTT.
    Deployed,
}

/// One version of a function, with its running pool. Immutable.
pub struct Deployed {
    /// The function's name, unique in the registry.
    name: Arc<str>,
    /// Its version: 0 for a function of the configuration file, the
    /// bundle's version for a deployed one.
    version: u64,
    /// The topic filters that trigger it.
    triggers: Vec<TopicFilter>,
    /// Its warm instances.
    pool: Pool,
    /// Where it comes from.
    origin: Origin,
    /// SHA-256 of its module (hex), for a deployed one.
    sha256: Option<String>,
    /// When it runs besides its triggers.
    schedule: Option<Arc<Schedule>>,
    /// What routes to it: its triggers, and its schedule's topic.
    routes: Vec<TopicFilter>,
}

impl Deployed {
    /// A version of `name` running on `pool`.
    pub fn new(
        name: &str,
        version: u64,
        triggers: Vec<TopicFilter>,
        pool: Pool,
        origin: Origin,
    ) -> Deployed {
        Deployed {
            name: name.into(),
            version,
            routes: triggers.clone(),
            triggers,
            pool,
            origin,
            sha256: None,
            schedule: None,
        }
    }

    /// The same, run on `schedule` too.
    pub fn with_schedule(mut self, schedule: Schedule) -> Deployed {
        let topic = crate::schedule::topic(&self.name);
        self.routes
            .push(TopicFilter::new(&topic).expect("a function name makes a topic"));
        self.schedule = Some(Arc::new(schedule));
        self
    }

    /// When it runs besides its triggers, if at all.
    pub fn schedule(&self) -> Option<&Arc<Schedule>> {
        self.schedule.as_ref()
    }

    /// The same, with the SHA-256 of its module (hex).
    pub fn with_sha256(self, sha256: String) -> Deployed {
        Deployed {
            sha256: Some(sha256),
            ..self
        }
    }

    /// SHA-256 of its module (hex), for a deployed one.
    pub fn sha256(&self) -> Option<&str> {
        self.sha256.as_deref()
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This version's number.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The topic filters that trigger it.
    pub fn triggers(&self) -> &[TopicFilter] {
        &self.triggers
    }

    /// Where it comes from.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// Its durable state (its name's, shared by its versions).
    pub fn state(&self) -> &Arc<FunctionState> {
        &self.pool.function().spec().state
    }

    /// Its pool, to submit messages to.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Its pool, when this is the last reference: to stop it and join its
    /// workers.
    pub fn into_pool(self) -> Pool {
        self.pool
    }
}

/// The functions at one moment, and which topics trigger which. Immutable:
/// a change makes a new one.
#[derive(Default)]
pub struct Table {
    /// In installation order (the configuration's first).
    functions: Vec<Arc<Deployed>>,
    /// Topic → indexes into `functions`.
    router: Router,
}

impl Table {
    fn new(functions: Vec<Arc<Deployed>>) -> Table {
        let router = Router::new(functions.iter().map(|f| f.routes.as_slice()));
        Table { functions, router }
    }

    /// The functions `topic` triggers, as indexes for [`Table::function`],
    /// each once, in installation order, written into `out` (cleared
    /// first).
    pub fn route_into(&self, topic: &str, out: &mut Vec<usize>) {
        self.router.route_into(topic, out);
    }

    /// The function at index `i` of a [`Table::route_into`] answer.
    pub fn function(&self, i: usize) -> &Arc<Deployed> {
        &self.functions[i]
    }

    /// Whether any function is triggered by `topic`.
    pub fn matches_any(&self, topic: &str) -> bool {
        self.router.matches_any(topic)
    }

    /// Every function, in installation order.
    pub fn functions(&self) -> &[Arc<Deployed>] {
        &self.functions
    }

    /// The function called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Deployed>> {
        self.functions.iter().find(|f| f.name() == name)
    }

    /// The index (for [`Table::function`]) of the function called `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.functions.iter().position(|f| f.name() == name)
    }

    /// Every distinct trigger filter, in installation order (not the
    /// schedules' topics, which no broker delivers).
    pub fn filters(&self) -> Vec<String> {
        self.router
            .filters()
            .into_iter()
            .filter(|f| !f.as_str().starts_with(crate::schedule::TOPIC_PREFIX))
            .map(|f| f.to_string())
            .collect()
    }

    /// The scheduled functions and their schedules.
    pub fn schedules(&self) -> Schedules {
        self.functions
            .iter()
            .filter_map(|f| Some((f.name.clone(), f.schedule.clone()?)))
            .collect()
    }
}

/// The set of trigger filters, as ingest subscribes to it.
pub type Filters = Arc<[String]>;

/// The spec to load a `[[functions]]` table's module with, for a gateway
/// whose upstream topic prefix is `topic_prefix` (empty without an
/// upstream), with a state and counters of its own (a running gateway
/// shares them across versions: [`Registry::spec`]).
pub fn function_spec(f: &crate::config::FunctionConfig, topic_prefix: &str) -> FunctionSpec {
    FunctionSpec {
        name: f.name.as_str().into(),
        env: f.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        memory_limit: f.memory_limit,
        timeout: f.timeout,
        max_record_size: f.max_record_size,
        max_emit_bytes: f.max_emit_bytes,
        max_topic_len: crate::runtime::MAX_TOPIC_LEN.saturating_sub(topic_prefix.len()),
        log_rate_limit: f.log_rate_limit,
        fuel: f.fuel,
        emit_allow: f.emit_allow.clone().map(Arc::from),
        publish_allow: f.publish_allow.clone().into(),
        state: FunctionState::new(&f.name, f.state_limit),
        calls: Arc::default(),
    }
}

/// The scheduled functions, as the scheduler follows them.
pub type Schedules = Arc<[(Arc<str>, Arc<Schedule>)]>;

/// The functions that run now (see the module doc).
pub struct Registry {
    /// The current table.
    current: ArcSwap<Table>,
    /// Serialises changes (readers never take it).
    changing: Mutex<Counters>,
    /// The current table's filters; sent only when they change.
    filters: watch::Sender<Filters>,
    /// The current table's schedules; sent only when they change.
    schedules: watch::Sender<Schedules>,
}

/// What belongs to a function's name and is kept across its versions.
#[derive(Default)]
struct Counters {
    /// Counters, by function name.
    by_name: HashMap<String, Arc<FunctionMetrics>>,
    /// Refused import calls, by function name.
    calls: HashMap<String, Arc<RefusedCalls>>,
    /// Durable state, by function name.
    states: HashMap<String, Arc<FunctionState>>,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            current: ArcSwap::from_pointee(Table::default()),
            changing: Mutex::new(Counters::default()),
            filters: watch::channel(Filters::from(Vec::new())).0,
            schedules: watch::channel(Schedules::from(Vec::new())).0,
        }
    }
}

impl Registry {
    /// The current table: take it once per message.
    pub fn table(&self) -> Arc<Table> {
        self.current.load_full()
    }

    /// Whether any current function is triggered by `topic` as a broker
    /// delivers it: never by a schedule's topic, which only the scheduler
    /// uses.
    pub fn matches_any(&self, topic: &str) -> bool {
        !topic.starts_with(crate::schedule::TOPIC_PREFIX) && self.current.load().matches_any(topic)
    }

    /// Loads the committed state of functions (by name) read from the
    /// store at start-up; a function started later with that name gets it.
    pub fn preload_state(&self, states: HashMap<String, Entries>) {
        let mut c = self.changing.lock().expect("registry lock");
        for (name, entries) in states {
            let state = FunctionState::with(&name, crate::state::DEFAULT_LIMIT, entries);
            c.states.insert(name, state);
        }
    }

    /// The spec to load `f`'s module with: its limits, and the state and
    /// counters its name keeps across versions.
    pub fn spec(&self, f: &crate::config::FunctionConfig, topic_prefix: &str) -> FunctionSpec {
        let mut spec = function_spec(f, topic_prefix);
        let mut c = self.changing.lock().expect("registry lock");
        let state = c
            .states
            .entry(f.name.clone())
            .or_insert_with(|| spec.state.clone());
        state.set_limit(f.state_limit);
        spec.state = state.clone();
        spec.calls = c.calls.entry(f.name.clone()).or_default().clone();
        spec
    }

    /// The state of the function called `name`, if it has one.
    pub fn state(&self, name: &str) -> Option<Arc<FunctionState>> {
        let c = self.changing.lock().expect("registry lock");
        c.states.get(name).cloned()
    }

    /// The refused import calls of the function called `name`.
    pub fn refused_calls(&self, name: &str) -> Arc<RefusedCalls> {
        let mut c = self.changing.lock().expect("registry lock");
        c.calls.entry(name.to_owned()).or_default().clone()
    }

    /// Forgets the state of the function called `name` (it was removed):
    /// its outcomes still in flight write none.
    pub fn forget_state(&self, name: &str) {
        let mut c = self.changing.lock().expect("registry lock");
        if let Some(s) = c.states.remove(name) {
            s.mark_removed();
        }
    }

    /// Starts `function`'s instances as `f` says (counted under its name)
    /// and makes it a version to install: `version` from `origin`.
    pub fn start(
        &self,
        function: crate::runtime::Function,
        f: &crate::config::FunctionConfig,
        version: u64,
        origin: Origin,
    ) -> std::io::Result<Deployed> {
        let pool = Pool::start(
            Arc::new(function),
            f.concurrency,
            f.retries,
            self.metrics_for(&f.name),
        )?;
        let deployed = Deployed::new(&f.name, version, f.triggers.clone(), pool, origin);
        Ok(match &f.schedule {
            Some(s) => deployed.with_schedule(s.clone()),
            None => deployed,
        })
    }

    /// Whether `function` is the version of its name that runs now.
    pub fn is_running(&self, function: &Arc<Deployed>) -> bool {
        self.current
            .load()
            .get(function.name())
            .is_some_and(|f| Arc::ptr_eq(f, function))
    }

    /// The counters of the function called `name`: the same for every
    /// version of it, for the life of the process.
    pub fn metrics_for(&self, name: &str) -> Arc<FunctionMetrics> {
        let mut c = self.changing.lock().expect("registry lock");
        c.by_name.entry(name.to_owned()).or_default().clone()
    }

    /// Makes `function` the running version of its name, in place of the
    /// one before (returned), or added after the others. Messages routed
    /// from now on go to it.
    pub fn install(&self, function: Deployed) -> Option<Arc<Deployed>> {
        self.reinstate(Arc::new(function))
    }

    /// [`Registry::install`] for a version that ran before (a rollback).
    pub fn reinstate(&self, function: Arc<Deployed>) -> Option<Arc<Deployed>> {
        let _c = self.changing.lock().expect("registry lock");
        let old = self.current.load_full();
        let mut functions = old.functions.clone();
        let previous = match functions.iter().position(|f| f.name() == function.name()) {
            Some(i) => Some(std::mem::replace(&mut functions[i], function)),
            None => {
                functions.push(function);
                None
            }
        };
        self.swap(functions);
        previous
    }

    /// Takes the function called `name` out: no message is routed to it
    /// from now on. Returns it, if it was there.
    pub fn remove(&self, name: &str) -> Option<Arc<Deployed>> {
        let _c = self.changing.lock().expect("registry lock");
        let old = self.current.load_full();
        let mut functions = old.functions.clone();
        let i = functions.iter().position(|f| f.name() == name)?;
        let removed = functions.remove(i);
        self.swap(functions);
        Some(removed)
    }

    /// Takes every function out (at shutdown), returning them.
    pub fn clear(&self) -> Vec<Arc<Deployed>> {
        let _c = self.changing.lock().expect("registry lock");
        let old = self.current.swap(Arc::new(Table::default()));
        self.filters.send_if_modified(|f| {
            let changed = !f.is_empty();
            *f = Filters::from(Vec::new());
            changed
        });
        self.schedules.send_if_modified(|s| {
            let changed = !s.is_empty();
            *s = Schedules::from(Vec::new());
            changed
        });
        match Arc::try_unwrap(old) {
            Ok(t) => t.functions,
            Err(shared) => shared.functions.clone(),
        }
    }

    /// Follows the set of trigger filters: the current one, then every
    /// change.
    pub fn filters(&self) -> watch::Receiver<Filters> {
        self.filters.subscribe()
    }

    /// Follows the scheduled functions: the current ones, then every
    /// change.
    pub fn schedules(&self) -> watch::Receiver<Schedules> {
        self.schedules.subscribe()
    }

    /// Installs a table of `functions` and publishes its filters if they
    /// changed. The caller holds `changing`.
    fn swap(&self, functions: Vec<Arc<Deployed>>) {
        let table = Table::new(functions);
        let filters = table.filters();
        let schedules = table.schedules();
        self.current.store(Arc::new(table));
        self.schedules.send_if_modified(|s| {
            let same = s.len() == schedules.len()
                && s.iter()
                    .zip(schedules.iter())
                    .all(|(a, b)| a.0 == b.0 && Arc::ptr_eq(&a.1, &b.1));
            if same {
                return false;
            }
            *s = schedules;
            true
        });
        self.filters.send_if_modified(|f| {
            if **f == *filters {
                return false;
            }
            *f = filters.into();
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{FunctionSpec, Runtime, Target};

    /// A handler that emits its input to `out/<tag>`.
    fn module(tag: &str) -> Vec<u8> {
        let topic = format!("out/{tag}");
        wat::parse_str(format!(
            r#"(module
              (import "edgefn" "emit" (func $emit (param i32 i32 i32 i32) (result i32)))
              (memory (export "memory") 1)
              (data (i32.const 16) "{topic}")
              (global $next (mut i32) (i32.const 1024))
              (func (export "edgefn_abi_version") (result i32) i32.const 1)
              (func (export "edgefn_alloc") (param i32) (result i32)
                global.get $next)
              (func (export "edgefn_on_message") (param i32 i32 i32 i32) (result i32)
                (drop (call $emit (i32.const 16) (i32.const {len}) (local.get 2) (local.get 3)))
                i32.const 0))"#,
            len = topic.len()
        ))
        .unwrap()
    }

    fn deployed(
        registry: &Registry,
        rt: &Runtime,
        name: &str,
        tag: &str,
        triggers: &[&str],
    ) -> Deployed {
        let spec = FunctionSpec::for_test(name);
        let f = rt.load(name, &module(tag), spec).unwrap();
        let pool = Pool::start(Arc::new(f), 1, 0, registry.metrics_for(name)).unwrap();
        let triggers = triggers
            .iter()
            .map(|t| TopicFilter::new(t).unwrap())
            .collect();
        Deployed::new(name, 1, triggers, pool, Origin::Deployed)
    }

    async fn emitted_topic(f: &Deployed) -> String {
        let outcome = f
            .pool()
            .submit("in".into(), "x".into())
            .await
            .await
            .unwrap();
        match outcome {
            crate::runtime::pool::Outcome::Ok(out) => out.records[0].topic.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_routed_message_finishes_on_its_version_and_the_next_goes_to_the_new_one() {
        let rt = Runtime::new(Target::Native).unwrap();
        let registry = Registry::default();
        assert!(
            registry
                .install(deployed(&registry, &rt, "clean", "v1", &["a/#"]))
                .is_none()
        );
        let routed = registry.table();
        let mut out = Vec::new();
        routed.route_into("a/1", &mut out);
        let v1 = routed.function(out[0]).clone();

        let previous = registry.install(deployed(&registry, &rt, "clean", "v2", &["a/#"]));
        assert_eq!(previous.map(|p| Arc::ptr_eq(&p, &v1)), Some(true));
        // The old table, and the version it routed to, still work.
        assert_eq!(emitted_topic(&v1).await, "out/v1");
        let now = registry.table();
        now.route_into("a/1", &mut out);
        assert_eq!(emitted_topic(now.function(out[0])).await, "out/v2");
        assert_eq!(now.functions().len(), 1);
        // Counters carry on across versions.
        let m = registry.metrics_for("clean");
        assert_eq!(m.invocations.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn filter_changes_are_published_only_when_the_set_changes() {
        let rt = Runtime::new(Target::Native).unwrap();
        let registry = Registry::default();
        let mut filters = registry.filters();
        assert!(filters.borrow_and_update().is_empty());
        registry.install(deployed(&registry, &rt, "a", "a", &["s/+/t", "x/#"]));
        assert!(filters.has_changed().unwrap());
        assert_eq!(filters.borrow_and_update().to_vec(), ["s/+/t", "x/#"]);
        // Another function on the same filter, and a new version of one:
        // the set is the same.
        registry.install(deployed(&registry, &rt, "b", "b", &["x/#"]));
        registry.install(deployed(&registry, &rt, "a", "a2", &["s/+/t", "x/#"]));
        assert!(!filters.has_changed().unwrap());
        registry.remove("a");
        assert_eq!(filters.borrow_and_update().to_vec(), ["x/#"]);
        assert!(registry.remove("a").is_none());
        assert!(!registry.matches_any("s/1/t"));
        assert!(registry.matches_any("x/1"));
        assert_eq!(registry.clear().len(), 1);
        assert!(filters.borrow_and_update().is_empty());
        assert!(registry.table().functions().is_empty());
    }
}
