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
    let listeners = prepared.cfg.listeners.clone();
    let mut engine = Engine::build(prepared)?;
    let bound = http::serve(&listeners, engine.shared.clone()).await?;
    info!(
        mode = %crate::engine::mode_name(engine.collector.mode()),
        "leakwatch watching; {bound}"
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
