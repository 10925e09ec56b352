//! An in-memory stand-in for the Kubernetes API, just deep enough for the operator's calls:
//! GET, server-side apply (data keys merged, so other writers' keys survive, and keys the
//! applier set before but leaves out now removed, as field ownership does), status apply,
//! DELETE, and Event creation. The real apiserver is exercised by the end-to-end suite; this
//! lets the integration tests drive the real reconcilers against the real OAuth server.
//!
//! Opt-in, for tests that need them: every request counted (GETs included), writes to a path
//! failing as an apiserver outage would ([`FakeApi::fail_writes`]), and `resourceVersion`s kept
//! and enforced as the apiserver does ([`FakeApi::versioned`]: each write stamps a new one, and a
//! write naming another than the stored one is refused 409 Conflict).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

/// The stored objects by API path, and every write made.
#[derive(Clone, Default)]
pub struct FakeApi {
    objects: Arc<Mutex<BTreeMap<String, Value>>>,
    writes: Arc<Mutex<Vec<String>>>,
    /// Data keys each object's applier set in its last apply.
    applied: Arc<Mutex<BTreeMap<String, Vec<String>>>>,
    /// `METHOD path` of every request, reads included.
    requests: Arc<Mutex<Vec<String>>>,
    /// Bodies of the objects created (POST), by path: Events.
    created: Arc<Mutex<Vec<(String, Value)>>>,
    /// Writes to these paths fail (500) this many more times.
    failing: Arc<Mutex<BTreeMap<String, usize>>>,
    /// Whether `resourceVersion`s are stamped and enforced.
    versioned: Arc<AtomicBool>,
    /// The last `resourceVersion` given out.
    version: Arc<AtomicU64>,
}

fn merge_object(old: &mut Value, new: &Value) {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            for (k, v) in n {
                if v.is_null() {
                    // A merge patch's null removes the key.
                    o.remove(k);
                } else if k == "data" || k == "metadata" || k == "labels" || k == "annotations" {
                    merge_object(o.entry(k.clone()).or_insert_with(|| json!({})), v);
                } else {
                    o.insert(k.clone(), v.clone());
                }
            }
        }
        (o, n) => *o = n.clone(),
    }
}

impl FakeApi {
    /// A client whose requests this fake answers.
    pub fn client(&self) -> Client {
        let me = self.clone();
        let service = tower::service_fn(move |req: Request<Body>| {
            let me = me.clone();
            async move { Ok::<_, Infallible>(me.handle(req).await) }
        });
        Client::new(service, "default")
    }

    /// Stores an object at its path (with a new `resourceVersion` when versioned), as another
    /// writer would.
    pub fn put(&self, path: &str, mut object: Value) {
        self.stamp(&mut object);
        self.objects.lock().expect("lock").insert(path.to_owned(), object);
    }

    /// From now on every write stamps a new `resourceVersion`, and a write that names another one
    /// than the stored object's is refused with 409 Conflict, as the apiserver does.
    pub fn versioned(&self) {
        self.versioned.store(true, Ordering::SeqCst);
    }

    /// The next `times` writes (PATCH, POST) to `path` fail with 500, as an apiserver outage
    /// would; `usize::MAX`: until [`FakeApi::heal`].
    pub fn fail_writes(&self, path: &str, times: usize) {
        self.failing.lock().expect("lock").insert(path.to_owned(), times);
    }

    /// Writes to `path` succeed again.
    pub fn heal(&self, path: &str) {
        self.failing.lock().expect("lock").remove(path);
    }

    /// How many GETs of `path` were made.
    pub fn gets(&self, path: &str) -> usize {
        let wanted = format!("GET {path}");
        self.requests.lock().expect("lock").iter().filter(|r| **r == wanted).count()
    }

    /// The bodies of the Events created so far.
    pub fn events(&self) -> Vec<Value> {
        self.created
            .lock()
            .expect("lock")
            .iter()
            .filter(|(p, _)| p.ends_with("/events"))
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn stamp(&self, object: &mut Value) {
        if self.versioned.load(Ordering::SeqCst) && object.is_object() {
            let rv = self.version.fetch_add(1, Ordering::SeqCst) + 1;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
        }
    }

    /// A 409 when versioned and `body` names another `resourceVersion` than the stored object's.
    fn conflicts(&self, path: &str, body: &Value) -> bool {
        if !self.versioned.load(Ordering::SeqCst) {
            return false;
        }
        let Some(wanted) = body["metadata"]["resourceVersion"].as_str() else { return false };
        let stored = self.get(path);
        stored.as_ref().and_then(|o| o["metadata"]["resourceVersion"].as_str()) != Some(wanted)
    }

    /// Whether this write is to fail (and counts it).
    fn fails(&self, path: &str) -> bool {
        let mut failing = self.failing.lock().expect("lock");
        match failing.get_mut(path) {
            Some(0) | None => false,
            Some(n) => {
                if *n != usize::MAX {
                    *n -= 1;
                }
                true
            }
        }
    }

    /// The object at a path.
    pub fn get(&self, path: &str) -> Option<Value> {
        self.objects.lock().expect("lock").get(path).cloned()
    }

    /// Removes the object at a path.
    pub fn delete(&self, path: &str) {
        self.objects.lock().expect("lock").remove(path);
    }

    /// `METHOD path` of every write so far.
    pub fn writes(&self) -> Vec<String> {
        self.writes.lock().expect("lock").clone()
    }

    async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let merge_patch = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/merge-patch+json"));
        let body: Value =
            serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap_or_default()).unwrap_or(Value::Null);
        self.requests.lock().expect("lock").push(format!("{method} {path}"));
        if method != Method::GET {
            self.writes.lock().expect("lock").push(format!("{method} {path}"));
            if self.fails(&path) {
                return respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError",
                            "code": 500, "message": "etcdserver: request timed out"}),
                );
            }
            let main = path.trim_end_matches("/status");
            if matches!(method, Method::PATCH) && self.conflicts(main, &body) {
                return respond(
                    StatusCode::CONFLICT,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict",
                            "code": 409, "message": "the object has been modified; please apply your changes to the latest version and try again"}),
                );
            }
        }
        match method {
            Method::GET => match self.get(&path) {
                Some(v) => respond(StatusCode::OK, &v),
                None => not_found(),
            },
            Method::DELETE => {
                self.delete(&path);
                respond(StatusCode::OK, &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}))
            }
            // A create of a Secret: stored at its name, refused when one exists (as the
            // apiserver does: 409 AlreadyExists).
            Method::POST if path.ends_with("/secrets") => {
                let name = body["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                let at = format!("{path}/{name}");
                if self.get(&at).is_some() {
                    return respond(
                        StatusCode::CONFLICT,
                        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists",
                                "code": 409, "message": format!("secrets \"{name}\" already exists")}),
                    );
                }
                let keys: Vec<String> =
                    body["data"].as_object().map(|d| d.keys().cloned().collect()).unwrap_or_default();
                self.applied.lock().expect("lock").insert(at.clone(), keys);
                let mut stored = body.clone();
                if self.versioned.load(Ordering::SeqCst) {
                    let rv = self.version.fetch_add(1, Ordering::SeqCst) + 1;
                    stored["metadata"]["resourceVersion"] = json!(rv.to_string());
                }
                self.objects.lock().expect("lock").insert(at, stored.clone());
                respond(StatusCode::CREATED, &stored)
            }
            Method::POST => {
                self.created.lock().expect("lock").push((path, body.clone()));
                respond(StatusCode::CREATED, &body)
            }
            Method::PATCH if path.ends_with("/status") => {
                let main = path.trim_end_matches("/status").to_owned();
                let Some(mut object) = self.get(&main) else { return not_found() };
                object["status"] = body["status"].clone();
                self.put(&main, object.clone());
                let Some(object) = self.get(&main) else { return not_found() };
                respond(StatusCode::OK, &object)
            }
            // A JSON merge patch (null removes a key), not an apply: what earlier applies set stays.
            Method::PATCH if merge_patch => {
                let mut objects = self.objects.lock().expect("lock");
                let Some(stored) = objects.get_mut(&path) else { return not_found() };
                let mut patch = body.clone();
                if let Some(m) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.remove("resourceVersion");
                }
                merge_object(stored, &patch);
                if let Some(keys) = self.applied.lock().expect("lock").get_mut(&path) {
                    let gone: Vec<String> = body["data"]
                        .as_object()
                        .map(|d| d.iter().filter(|(_, v)| v.is_null()).map(|(k, _)| k.clone()).collect())
                        .unwrap_or_default();
                    keys.retain(|k| !gone.contains(k));
                }
                if self.versioned.load(Ordering::SeqCst) {
                    let rv = self.version.fetch_add(1, Ordering::SeqCst) + 1;
                    stored["metadata"]["resourceVersion"] = json!(rv.to_string());
                }
                respond(StatusCode::OK, stored)
            }
            Method::PATCH => {
                let keys: Vec<String> =
                    body["data"].as_object().map(|d| d.keys().cloned().collect()).unwrap_or_default();
                let before = self.applied.lock().expect("lock").insert(path.clone(), keys.clone()).unwrap_or_default();
                let mut objects = self.objects.lock().expect("lock");
                let stored = objects.entry(path).or_insert_with(|| json!({}));
                if let Some(data) = stored["data"].as_object_mut() {
                    for gone in before.iter().filter(|k| !keys.contains(k)) {
                        data.remove(gone);
                    }
                }
                merge_object(stored, &body);
                if self.versioned.load(Ordering::SeqCst) {
                    let rv = self.version.fetch_add(1, Ordering::SeqCst) + 1;
                    stored["metadata"]["resourceVersion"] = json!(rv.to_string());
                }
                respond(StatusCode::OK, stored)
            }
            _ => respond(StatusCode::METHOD_NOT_ALLOWED, &json!({})),
        }
    }
}

fn respond(status: StatusCode, v: &Value) -> Response<Body> {
    Response::builder().status(status).body(Body::from(serde_json::to_vec(v).expect("json"))).expect("response")
}

fn not_found() -> Response<Body> {
    respond(
        StatusCode::NOT_FOUND,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}
