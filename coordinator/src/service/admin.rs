//! The `Admin` service: the run's status for operators (`fedtune-coordinator status`).

use std::sync::Arc;

use fedtune_proto as pb;
use fedtune_proto::admin_server::Admin as AdminRpc;
use tonic::{Request, Response, Status};

use crate::auth::Gate;
use crate::round::Federation;

/// The `Admin` service: the run's status for operators, behind the gate's admin check.
pub struct AdminService {
    engine: Arc<Federation>,
    gate: Arc<Gate>,
}

impl AdminService {
    pub fn new(engine: Arc<Federation>, gate: Arc<Gate>) -> Self {
        Self { engine, gate }
    }
}

#[tonic::async_trait]
impl AdminRpc for AdminService {
    async fn get_status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::RunStatus>, Status> {
        self.gate.admit_admin(&request)?;
        Ok(Response::new(self.engine.status()))
    }
}
