//! The standard gRPC services on the admin port, for tools that know nothing of
//! `scm.admin.v1`: `grpc.health.v1.Health` (load balancers, `grpc_health_probe`,
//! orchestrators) and `grpc.reflection.v1.ServerReflection` (`grpcurl`, Postman), both
//! behind the same mutual TLS as the admin API itself.
//!
//! Health answers for `""` (the SCM as a whole) and `scm.admin.v1.Admin`: `SERVING` while
//! the database answers its probe (the one `/health` uses) within the health check's
//! bound and the listeners are not shutting down, `NOT_SERVING` otherwise; any other
//! service name is `NOT_FOUND`, as the health protocol asks.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::ops::Ops;

/// How long the database probe behind a health answer may take.
const PROBE_TIME: Duration = Duration::from_secs(2);

/// How often a `Watch` stream probes again (a change is sent at once after the probe).
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// `grpc.health.v1.Health` over the SCM's state.
#[derive(Debug, Clone)]
pub(crate) struct HealthService {
    ops: Arc<Ops>,
    /// Cancelled when the SCM shuts down (the listeners stop): `NOT_SERVING` from then.
    shutdown: CancellationToken,
}

impl HealthService {
    /// The service; `shutdown` is the listeners' token.
    pub(crate) fn new(ops: Arc<Ops>, shutdown: CancellationToken) -> HealthService {
        HealthService { ops, shutdown }
    }

    /// The tonic server around it.
    pub(crate) fn server(self) -> HealthServer<HealthService> {
        HealthServer::new(self)
    }

    /// The status of `service`, probing the database.
    async fn status(&self, service: &str) -> Result<ServingStatus, Status> {
        if !service.is_empty() && service != scm_proto::admin::SERVICE_NAME {
            return Err(Status::not_found(format!(
                "no service {service:?} here; ask for \"\" (the SCM) or \"{}\"",
                scm_proto::admin::SERVICE_NAME
            )));
        }
        if self.shutdown.is_cancelled() {
            return Ok(ServingStatus::NotServing);
        }
        let probe = tokio::time::timeout(PROBE_TIME, self.ops.store.health().probe()).await;
        Ok(match probe {
            Ok(Ok(())) => ServingStatus::Serving,
            Ok(Err(e)) => {
                tracing::warn!("gRPC health: database unreachable: {e}");
                ServingStatus::NotServing
            }
            Err(_) => {
                tracing::warn!("gRPC health: database did not answer within {PROBE_TIME:?}");
                ServingStatus::NotServing
            }
        })
    }
}

fn response(s: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse { status: s as i32 }
}

/// The stream of a `Watch`.
pub(crate) type WatchStream =
    Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::codegen::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let s = self.status(&req.get_ref().service).await?;
        Ok(Response::new(response(s)))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = req.into_inner().service;
        let first = self.status(&service).await?;
        let me = self.clone();
        // The current status at once, then each change; after shutdown one last
        // NOT_SERVING, and the stream ends.
        let stream = futures_util::stream::unfold(
            (me, service, None::<ServingStatus>, first),
            |(me, service, last, now)| async move {
                let mut now = now;
                loop {
                    if last == Some(ServingStatus::NotServing) && me.shutdown.is_cancelled() {
                        return None;
                    }
                    if last != Some(now) {
                        return Some((Ok(response(now)), (me, service, Some(now), now)));
                    }
                    tokio::select! {
                        _ = me.shutdown.cancelled() => {}
                        _ = tokio::time::sleep(WATCH_EVERY) => {}
                    }
                    now = me
                        .status(&service)
                        .await
                        .unwrap_or(ServingStatus::NotServing);
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

/// `grpc.reflection.v1.ServerReflection` describing every service on the port.
pub(crate) fn reflection_v1() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    reflection_builder().build_v1()
}

/// The same as `grpc.reflection.v1alpha`, which older clients ask for first.
pub(crate) fn reflection_v1alpha() -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    reflection_builder().build_v1alpha()
}

fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(scm_proto::admin::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}
