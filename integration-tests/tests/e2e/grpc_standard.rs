//! The standard gRPC services on the admin port, with the real clients of
//! `tonic-health` and `tonic-reflection` over the operator's mutual TLS: health follows
//! the SCM (SERVING, then NOT_SERVING when it shuts down), reflection lists and
//! describes every service.

use backoffice::admin::{H2Channel, channel_with, origin};
use integration_tests::{Fleet, WAIT};
use scm_certs::tls::{self as sctls, TlsPolicy};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::{dev_pems, rt};

async fn channel(fleet: &Fleet) -> H2Channel {
    let p = dev_pems(&fleet.dev(), "operator-admin");
    let cfg = sctls::client_config_from_pem(&p.ca, &p.cert, &p.key, TlsPolicy::default())
        .expect("client config");
    channel_with(&fleet.scm.listening("admin").to_string(), &cfg, WAIT)
        .await
        .expect("connect to the admin port")
}

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

#[test]
fn health_follows_the_scm_and_says_not_serving_at_shutdown() {
    let fleet = Fleet::start(&[1]);
    rt().block_on(async {
        let mut health = HealthClient::with_origin(channel(&fleet).await, origin());
        for service in ["", "scm.admin.v1.Admin"] {
            let r = health
                .check(check(service))
                .await
                .expect("health answers")
                .into_inner();
            assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
        }
        let e = health
            .check(check("nope.v1.Nope"))
            .await
            .expect_err("unknown service");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");

        let mut watch = health.watch(check("")).await.expect("watch").into_inner();
        let first = watch
            .message()
            .await
            .expect("stream")
            .expect("first status");
        assert_eq!(first.status(), ServingStatus::Serving);
        fleet.scm.signal("TERM");
        let last = watch
            .message()
            .await
            .expect("stream")
            .expect("status at shutdown");
        assert_eq!(last.status(), ServingStatus::NotServing);
    });
}

#[test]
fn reflection_lists_and_describes_the_services() {
    let fleet = Fleet::start(&[1]);
    rt().block_on(async {
        let mut refl = ServerReflectionClient::with_origin(channel(&fleet).await, origin());
        let ask = |m: MessageRequest| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(m),
        };
        let requests = futures_util::stream::iter(vec![
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol(
                "scm.admin.v1.Admin".into(),
            )),
        ]);
        let mut answers = refl
            .server_reflection_info(requests)
            .await
            .expect("reflection answers")
            .into_inner();
        let list = answers.message().await.expect("stream").expect("list");
        let Some(MessageResponse::ListServicesResponse(list)) = list.message_response else {
            panic!("not a service list: {list:?}");
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "scm.admin.v1.Admin"
            ]
        );
        let file = answers.message().await.expect("stream").expect("file");
        let Some(MessageResponse::FileDescriptorResponse(f)) = file.message_response else {
            panic!("not a file: {file:?}");
        };
        let files: Vec<prost_types_lite::File> = f
            .file_descriptor_proto
            .iter()
            .map(|b| prost_types_lite::decode(b))
            .collect();
        assert!(
            files.iter().any(|f| f.name == "scm/admin/v1/admin.proto"),
            "{files:?}"
        );
    });
}

/// Just enough of `FileDescriptorProto` (field 1 `name`, field 2 `package`) to check
/// what reflection sent, without another dependency.
mod prost_types_lite {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct File {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub package: String,
    }

    pub fn decode(b: &[u8]) -> File {
        prost::Message::decode(b).expect("a FileDescriptorProto")
    }
}
