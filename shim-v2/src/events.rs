//! Publishing task events to containerd.

use std::sync::Arc;

use containerd_shim::{publisher::RemotePublisher, Context};
use containerd_shim_protos::protobuf::MessageDyn;
use tracing::warn;

/// Publishes events for one containerd namespace. Cloning shares the connection.
#[derive(Clone)]
pub struct EventSink {
    publisher: Arc<RemotePublisher>,
    namespace: String,
}

impl EventSink {
    pub fn new(publisher: RemotePublisher, namespace: &str) -> Self {
        Self {
            publisher: Arc::new(publisher),
            namespace: namespace.to_string(),
        }
    }

    /// Queues `event` under `topic`. The publisher retries while containerd is away
    /// (e.g. restarting); a failure to queue is logged, never fatal to the task.
    pub async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(Context::default(), topic, &self.namespace, event)
            .await
        {
            warn!(topic, "publishing event failed: {e}");
        }
    }
}
