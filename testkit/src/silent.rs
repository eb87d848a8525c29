//! A node that takes TCP connections and never answers: no byte read or written, no
//! connection closed (a frozen process behind a live kernel; not even RabbitMQ's own
//! handshake timeout closes it, as it would behind a frozen [`crate::Proxy`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

pub struct SilentNode {
    pub addr: SocketAddr,
    held: Arc<Mutex<Vec<tokio::net::TcpStream>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SilentNode {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let held = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let held = held.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    held.lock().expect("lock").push(stream);
                }
            }
        });
        Self { addr, held, task }
    }

    /// Connections taken so far.
    pub fn accepted(&self) -> usize {
        self.held.lock().expect("lock").len()
    }
}

impl Drop for SilentNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}
