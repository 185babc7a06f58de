//! `leakwatch watch`: the sidecar. Runs until SIGTERM/SIGINT.
use std::ops::ControlFlow;

use anyhow::Result;
use tracing::info;

use super::Prepared;
use crate::{
    engine::{Engine, terminated},
    outputs::http,
};

pub async fn run(prepared: Prepared) -> Result<()> {
    let listen = prepared.cfg.listen;
    let mut engine = Engine::build(prepared)?;
    let addr = http::serve(listen, engine.shared.clone()).await?;
    info!(
        mode = %crate::engine::mode_name(engine.collector.mode()),
        "leakwatch watching; live page on http://{addr}/ (and /metrics, /status, /healthz)"
    );
    if let Some(r) = engine
        .run_until(terminated(), |_| ControlFlow::Continue(()))
        .await
    {
        r?;
    }
    // Dropping the engine detaches the probes; nothing is pinned, so nothing outlives us in the kernel.
    info!("leakwatch stopping: probes detached");
    Ok(())
}
