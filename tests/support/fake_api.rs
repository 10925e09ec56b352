//! An in-memory stand-in for the Kubernetes API, just deep enough for the operator's calls:
//! GET, server-side apply (data keys merged, so other writers' keys survive, and keys the
//! applier set before but leaves out now removed, as field ownership does), status apply,
//! DELETE, and Event creation. The real apiserver is exercised by the end-to-end suite; this
//! lets the integration tests drive the real reconcilers against the real OAuth server.

use std::collections::BTreeMap;
use std::convert::Infallible;
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

    /// Stores an object at its path.
    pub fn put(&self, path: &str, object: Value) {
        self.objects.lock().expect("lock").insert(path.to_owned(), object);
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
        let body: Value =
            serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap_or_default()).unwrap_or(Value::Null);
        if method != Method::GET {
            self.writes.lock().expect("lock").push(format!("{method} {path}"));
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
            Method::POST => respond(StatusCode::CREATED, &body),
            Method::PATCH if path.ends_with("/status") => {
                let main = path.trim_end_matches("/status").to_owned();
                let Some(mut object) = self.get(&main) else { return not_found() };
                object["status"] = body["status"].clone();
                self.put(&main, object.clone());
                respond(StatusCode::OK, &object)
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
