//! remotedialer's `sessionManager`: the server's websocket sessions by client key, split into
//! agents (`clients`) and peer servers (`peers`), plus the listeners (the sessions this server
//! opened to its peers) that are told, with AddClient/RemoveClient, about every session added or
//! removed here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use crate::frame::{Body, Frame};
use crate::metrics::MetricsHub;
use crate::session::{Session, next_message_id};

/// One of this server's sessions to a peer, announcing this server's sessions to it. The frames
/// are queued under the manager's lock (so announcements keep the order of the changes, as Go's
/// synchronous writes under `sm.Lock` do) and written by the peer's task.
struct Listener {
    session: Arc<Session>,
    tx: mpsc::UnboundedSender<Frame>,
}

#[derive(Default)]
struct Inner {
    clients: HashMap<String, Vec<Arc<Session>>>,
    peers: HashMap<String, Vec<Arc<Session>>>,
    listeners: Vec<Listener>,
}

/// How to dial a client: through `session`, with `prefix::proto` when the session is a peer's.
pub struct Route {
    pub session: Arc<Session>,
    /// The client key, when the session belongs to a peer that announced it (Go's `toDialer`
    /// prefix); `None` for the client's own session.
    pub prefix: Option<String>,
}

impl Route {
    /// The proto sent in Connect: `proto`, or `prefix::proto` through a peer.
    pub fn proto(&self, proto: &str) -> String {
        match &self.prefix {
            Some(p) => format!("{p}::{proto}"),
            None => proto.to_owned(),
        }
    }
}

pub struct SessionManager {
    inner: Mutex<Inner>,
    hub: Arc<MetricsHub>,
}

fn client_frame(add: bool, client_key: &str, session_key: i64) -> Frame {
    let client = format!("{client_key}/{session_key}");
    let body = if add {
        Body::AddClient(client)
    } else {
        Body::RemoveClient(client)
    };
    Frame::new(next_message_id(), 0, body)
}

impl SessionManager {
    pub fn new(hub: Arc<MetricsHub>) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            hub,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `sessionManager.add`: counts `total_add_websocket_session{clientkey, peer}` and tells
    /// every listener.
    pub fn add(&self, s: &Arc<Session>, peer: bool) {
        let mut m = self.lock();
        let store = if peer { &mut m.peers } else { &mut m.clients };
        store
            .entry(s.client_key.clone())
            .or_default()
            .push(s.clone());
        self.hub.tunnel.add_ws(&s.client_key, peer);
        for l in &m.listeners {
            let _ = l.tx.send(client_frame(true, &s.client_key, s.session_key));
        }
    }

    /// `sessionManager.remove`: counts `total_remove_websocket_session` for the store it was
    /// found in and tells every listener (even when it was not found, as Go does).
    pub fn remove(&self, s: &Arc<Session>) {
        let mut guard = self.lock();
        let m = &mut *guard;
        for (peer, store) in [(false, &mut m.clients), (true, &mut m.peers)] {
            let Some(v) = store.get_mut(&s.client_key) else {
                continue;
            };
            let before = v.len();
            v.retain(|x| x.session_key != s.session_key);
            for _ in v.len()..before {
                self.hub.tunnel.remove_ws(&s.client_key, peer);
            }
            if v.is_empty() {
                store.remove(&s.client_key);
            }
        }
        for l in &m.listeners {
            let _ = l.tx.send(client_frame(false, &s.client_key, s.session_key));
        }
    }

    /// `sessionManager.addListener`: the new listener is first told about every session held
    /// (agents and peers alike), then about every later change.
    pub fn add_listener(&self, session: &Arc<Session>) -> mpsc::UnboundedReceiver<Frame> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut m = self.lock();
        for (k, sessions) in m.clients.iter().chain(m.peers.iter()) {
            for s in sessions {
                let _ = tx.send(client_frame(true, k, s.session_key));
            }
        }
        m.listeners.push(Listener {
            session: session.clone(),
            tx,
        });
        rx
    }

    pub fn remove_listener(&self, session: &Arc<Session>) {
        self.lock()
            .listeners
            .retain(|l| !Arc::ptr_eq(&l.session, session));
    }

    /// `sessionManager.getDialer`: the client's first own session, else any peer session that
    /// announced the client (dialing with the `client::proto` prefix).
    pub fn route(&self, client: &str) -> Option<Route> {
        let m = self.lock();
        if let Some(s) = m.clients.get(client).and_then(|v| v.first()) {
            return Some(Route {
                session: s.clone(),
                prefix: None,
            });
        }
        m.peers
            .values()
            .flatten()
            .find(|s| s.has_remote_client(client))
            .map(|s| Route {
                session: s.clone(),
                prefix: Some(client.to_owned()),
            })
    }

    /// `ListClients`: the client keys with a session here (peers' clients are not listed).
    pub fn list_clients(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().clients.keys().cloned().collect();
        v.sort();
        v
    }

    /// The accepted peer sessions: (peer id, session key, clients it announced).
    pub fn peer_sessions(&self) -> Vec<(String, i64, Vec<String>)> {
        let m = self.lock();
        let mut v: Vec<_> = m
            .peers
            .iter()
            .flat_map(|(k, ss)| {
                ss.iter()
                    .map(|s| (k.clone(), s.session_key, s.remote_clients()))
            })
            .collect();
        v.sort();
        v
    }

    /// Every session held for `client_key`, agent or peer (for a deliberate close).
    pub fn sessions_of(&self, client_key: &str) -> Vec<Arc<Session>> {
        let m = self.lock();
        m.clients
            .get(client_key)
            .into_iter()
            .chain(m.peers.get(client_key))
            .flatten()
            .cloned()
            .collect()
    }

    /// (sessions, tunneled connections): accepted sessions plus the sessions opened to peers.
    pub fn totals(&self) -> (usize, usize) {
        let m = self.lock();
        let all = || {
            m.clients
                .values()
                .chain(m.peers.values())
                .flatten()
                .chain(m.listeners.iter().map(|l| &l.session))
        };
        (all().count(), all().map(|s| s.connection_count()).sum())
    }
}
