//! Settling a delivery at the moment its connection dies, by each path the bridge settles
//! through: batched acks ([`Acks`]) and one-by-one settlements ([`settle`]).
//!
//! lapin hands an ack, nack or reject to its internal RPC task. When the connection
//! dies, the IO loop queues "connection error" and then a stop marker for that task; a
//! settlement queued after the marker but before the task reached it is never read, and
//! its future never completes. In the bridge that left a lane waiting forever and a
//! SIGTERM after a lost connection never finished (`broker_connection_cut_mid_stream`
//! failed about one run in fifteen). Here the interleaving is forced, not hoped for:
//! lapin's tasks run behind a gate, held closed while the connection is cut and the
//! settlement is issued.

use async_rs::traits::Executor;
use async_rs::util::{RuntimeParts, Task};
use async_rs::{Runtime, Tokio};
use crisp_bridge::broker::acks::Acks;
use crisp_bridge::broker::settle::{settle, Settled, Settlement};
use crisp_bridge::outcome::RequeueKind;
use crisp_bridge_testkit::{amqp_url_via, broker_addr, eventually, BrokerClient, Proxy, WAIT};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_issued_as_the_connection_dies_completes_as_stale() {
    settle_as_the_connection_dies(Way::Ack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeue_issued_as_the_connection_dies_completes_as_stale() {
    settle_as_the_connection_dies(Way::Settle(RequeueKind::NotNow)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reject_issued_as_the_connection_dies_completes_as_stale() {
    settle_as_the_connection_dies(Way::Settle(RequeueKind::RetriesExhausted)).await;
}

/// How the delivery is settled: as the bridge acks (marked ready, sent by the channel's
/// [`Acks`], here as the session ends), or one by one. `Acks` sends `basic.ack` on the
/// channel, whose frame goes straight to the IO loop rather than behind the RPC task's
/// stop marker, so it must complete whether or not the channel-closed guard fires.
enum Way {
    Ack,
    Settle(RequeueKind),
}

async fn settle_as_the_connection_dies(way: Way) {
    let broker = BrokerClient::connect().await;
    let queue = format!("t.dying.{}", uuid::Uuid::new_v4().simple());
    let mut args = FieldTable::default();
    // The broker removes the queue itself, even when the test fails half way.
    args.insert("x-expires".into(), AMQPValue::LongInt(60_000));
    broker
        .channel
        .queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .expect("declare the test queue");
    broker
        .publish("", &queue, b"{}", BasicProperties::default())
        .await;

    let proxy = Proxy::start(broker_addr().await).await;
    let gate = Gate::default();
    let runtime = Runtime::new(RuntimeParts::new(
        GatedTokio {
            tokio: Tokio::current(),
            gate: gate.clone(),
        },
        Tokio::current(),
    ));
    let url = amqp_url_via(proxy.addr).await;
    let connection =
        Connection::connect_with_runtime(&url, ConnectionProperties::default(), runtime)
            .await
            .expect("connect through the proxy");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let delivery = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("a delivery in time")
        .expect("a delivery")
        .expect("a delivery, not an error");

    let acks = Acks::new(
        channel.clone(),
        1,
        &tokio_util::sync::CancellationToken::new(),
    );
    acks.received(delivery.delivery_tag);

    // lapin's IO thread sees the connection end and queues the error and the stop
    // marker, but its RPC task cannot run yet: the settlement below lands behind both.
    gate.close();
    let closed = tokio::time::timeout(WAIT, proxy.half_close())
        .await
        .expect("lapin gave the connection up in time");
    assert_eq!(closed, 1, "the proxy saw lapin close its socket");
    match way {
        Way::Ack => {
            acks.ack(delivery.delivery_tag);
            let mut closing = std::pin::pin!(acks.close());
            assert!(
                futures_util::poll!(&mut closing).is_pending(),
                "nothing can have been acked yet"
            );
            gate.open();
            tokio::time::timeout(WAIT, closing)
                .await
                .expect("the ack never completed after its connection died");
        }
        Way::Settle(kind) => {
            let mut settling =
                std::pin::pin!(settle(&channel, "", &delivery, Settlement::Requeue(kind)));
            assert!(
                futures_util::poll!(&mut settling).is_pending(),
                "nothing can have settled yet"
            );
            gate.open();
            let settled = tokio::time::timeout(WAIT, settling)
                .await
                .expect("the settlement never completed after its connection died");
            assert_eq!(settled, Settled::Stale);
        }
    }
    // Nothing is lost: the broker requeued the message when the connection ended.
    eventually("the message back in the queue", || async {
        (broker.ready(&queue).await == 1).then_some(())
    })
    .await;
    let _ = broker
        .channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
}

/// Holds lapin's internal tasks (its RPC loop among them) while closed.
#[derive(Clone, Debug, Default)]
struct Gate(Arc<GateState>);

#[derive(Debug, Default)]
struct GateState {
    closed: AtomicBool,
    waiting: Mutex<Vec<Waker>>,
}

impl Gate {
    fn close(&self) {
        self.0.closed.store(true, Ordering::SeqCst);
    }

    fn open(&self) {
        self.0.closed.store(false, Ordering::SeqCst);
        let waiting = std::mem::take(&mut *self.0.waiting.lock().expect("gate lock"));
        waiting.into_iter().for_each(Waker::wake);
    }
}

/// A future that does not run while its gate is closed.
struct Gated<F> {
    gate: Gate,
    inner: Pin<Box<F>>,
}

impl<F: Future> Future for Gated<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        {
            // Checked under the lock `open` takes, so no wake-up is missed.
            let mut waiting = self.gate.0.waiting.lock().expect("gate lock");
            if self.gate.0.closed.load(Ordering::SeqCst) {
                waiting.push(cx.waker().clone());
                return Poll::Pending;
            }
        }
        self.inner.as_mut().poll(cx)
    }
}

/// Tokio, except that every task lapin spawns goes through the gate. `block_on` (used
/// by lapin's IO thread) is not gated: the IO side keeps running.
#[derive(Clone, Debug)]
struct GatedTokio {
    tokio: Tokio,
    gate: Gate,
}

impl Executor for GatedTokio {
    type Task<T: Send + 'static> = <Tokio as Executor>::Task<T>;

    fn block_on<T, F: Future<Output = T>>(&self, f: F) -> T {
        self.tokio.block_on(f)
    }

    fn spawn<T: Send + 'static, F: Future<Output = T> + Send + 'static>(
        &self,
        f: F,
    ) -> Task<Self::Task<T>> {
        self.tokio.spawn(Gated {
            gate: self.gate.clone(),
            inner: Box::pin(f),
        })
    }

    fn spawn_blocking<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
        &self,
        f: F,
    ) -> Task<Self::Task<T>> {
        self.tokio.spawn_blocking(f)
    }
}
