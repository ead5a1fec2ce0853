//! Both front ends over the same use cases, in process: the same refused requests go
//! through the telnet console (over a pipe, logged in as by a certificate) and through
//! the gRPC service (called directly, with the caller in the request's extensions), and
//! must be refused for the same reason, with the same audit trail and nothing stored.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use scm_common::Secret;
use scm_proto::admin as pb;
use scm_proto::admin::admin_server::Admin;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Status};

use crate::app::config::ScmConfig;
use crate::front::admin::{AdminService, Caller, op_status};
use crate::front::telnet::TelnetContext;
use crate::front::telnet::refusal;
use crate::front::telnet::reply::ReplyCode;
use crate::ops::auth::{OperatorConfig, OperatorRole};
use crate::ops::fleet::SelectError;
use crate::ops::operator::OpError;
use crate::state::StoreError;

/// Largest configuration the test hub accepts.
const MAX: usize = 64;

/// The console's context (and through it the use-case layer) over a fresh development setup (machines 1 and 2, operators `admin` and the
/// read-only `viewer`), with a small configuration limit.
async fn console(dir: &std::path::Path) -> Arc<TelnetContext> {
    let r = crate::app::initdev::init_dev(dir, &[1, 2]).expect("init-dev");
    let mut cfg = ScmConfig::load(&r.scm_config, &Default::default()).expect("config");
    cfg.operators.push(OperatorConfig {
        name: "viewer".into(),
        password_hash: Secret::default(),
        role: OperatorRole::ReadOnly,
    });
    cfg.limits.max_config_bytes = MAX;
    crate::app::server::prepare(cfg).expect("prepare").telnet
}

fn peer() -> SocketAddr {
    "127.0.0.1:4000".parse().unwrap()
}

/// A console session on a pipe.
struct Console {
    io: DuplexStream,
}

impl Console {
    async fn open(ctx: &Arc<TelnetContext>, operator: &str) -> Console {
        let (client, server) = tokio::io::duplex(1 << 16);
        tokio::spawn(crate::front::telnet::serve_logged_in(
            ctx.clone(),
            server,
            peer(),
            operator.to_owned(),
            CancellationToken::new(),
        ));
        let mut c = Console { io: client };
        let hello = c.until_prompt().await;
        assert!(hello.contains("230 logged in as"), "{hello}");
        c
    }

    /// Everything up to the next prompt.
    async fn until_prompt(&mut self) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(crate::front::telnet::PROMPT.as_bytes()) {
            let n = tokio::time::timeout(Duration::from_secs(20), self.io.read(&mut buf))
                .await
                .expect("the console answers")
                .expect("read");
            assert!(n > 0, "console closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    /// Sends lines (CR LF after each), returns the answer up to the next prompt.
    async fn send(&mut self, lines: &[&str]) -> String {
        let mut text = String::new();
        for l in lines {
            text.push_str(l);
            text.push_str("\r\n");
        }
        self.io.write_all(text.as_bytes()).await.expect("write");
        self.until_prompt().await
    }
}

fn request<T>(msg: T, operator: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.extensions_mut().insert(Caller {
        operator: operator.into(),
        peer: peer(),
    });
    r
}

async fn grpc_push(svc: &AdminService, operator: &str, target: &str, content: &[u8]) -> Status {
    let req = pb::PushConfigRequest {
        target: target.into(),
        content: content.to_vec(),
    };
    svc.push_config(request(req, operator))
        .await
        .expect_err("refused")
}

#[tokio::test]
async fn both_front_ends_refuse_the_same_requests_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = console(dir.path()).await;
    let svc = AdminService::new(ctx.ops.clone(), CancellationToken::new());
    let mut admin = Console::open(&ctx, "admin").await;
    let mut viewer = Console::open(&ctx, "viewer").await;
    let big = "x".repeat(MAX + 1);

    let console = viewer.send(&["push 1"]).await;
    let status = grpc_push(&svc, "viewer", "1", b"a=1\n").await;
    assert!(
        console.contains("550 operator viewer is read-only and cannot push"),
        "{console}"
    );
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("read-only"), "{status:?}");

    let console = viewer.send(&["push group:dev"]).await;
    let status = grpc_push(&svc, "viewer", "group:dev", b"a=1\n").await;
    assert!(
        console.contains("550 operator viewer is read-only"),
        "{console}"
    );
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // The role is checked before the target: a read-only operator learns nothing.
    let console = viewer.send(&["push 9"]).await;
    let status = grpc_push(&svc, "viewer", "9", b"a=1\n").await;
    assert!(
        console.contains("550 operator viewer is read-only"),
        "{console}"
    );
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    let console = admin.send(&["push 9"]).await;
    let status = grpc_push(&svc, "admin", "9", b"a=1\n").await;
    assert!(
        console.contains("550 machine 9 is not known to this SCM"),
        "{console}"
    );
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().contains("machine 9 is not known"),
        "{status:?}"
    );

    let console = admin.send(&["push group:roof"]).await;
    let status = grpc_push(&svc, "admin", "group:roof", b"a=1\n").await;
    assert!(
        console.contains("550 no machine is in group \"roof\""),
        "{console}"
    );
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().contains("no machine is in group"),
        "{status:?}"
    );

    let console = admin.send(&["push x:y"]).await;
    let status = grpc_push(&svc, "admin", "x:y", b"a=1\n").await;
    assert!(console.contains("501 \"x:y\" is not a target"), "{console}");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("is not a target"), "{status:?}");

    let console = admin.send(&["push 1", "."]).await;
    let status = grpc_push(&svc, "admin", "1", b"").await;
    assert!(
        console.contains("354 ") && console.contains("501 empty configuration; nothing sent"),
        "{console}"
    );
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("empty configuration"),
        "{status:?}"
    );

    let console = admin.send(&["push all", "."]).await;
    assert!(
        console.contains("501 empty configuration; nothing sent") && !console.contains("151-"),
        "a fleet push refused at once shows no progress: {console}"
    );

    let console = admin.send(&["push 1", &big, "."]).await;
    let status = grpc_push(&svc, "admin", "1", big.as_bytes()).await;
    assert!(
        console.contains("552 configuration refused (larger than 64 bytes"),
        "{console}"
    );
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("at most 64 bytes can be sent"),
        "{status:?}"
    );

    // Reads of an unknown machine.
    let console = admin.send(&["status 9"]).await;
    let status = svc
        .get_machine(request(
            pb::GetMachineRequest {
                id: 9,
                history_limit: 0,
            },
            "admin",
        ))
        .await
        .expect_err("unknown machine");
    assert!(
        console.contains("550 machine 9 is not known; `machines` lists the known ones"),
        "{console}"
    );
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let console = admin.send(&["history 9"]).await;
    assert!(console.contains("550 machine 9 is not known"), "{console}");

    // A read-only operator's rollback (the console's only) is refused the same way.
    let console = viewer.send(&["rollback 1 1"]).await;
    assert!(
        console.contains("550 operator viewer is read-only and cannot push"),
        "{console}"
    );

    // Nothing was stored; each refusal of a read-only operator is audited once, with the
    // same wording whichever front end it came through.
    let history = ctx.ops.store.fleet().history(1, 10).await.unwrap();
    assert!(history.is_empty(), "{history:?}");
    let audit = ctx.ops.store.audit().list(100).await.unwrap();
    let refused: Vec<&str> = audit
        .iter()
        .filter(|a| a.action == "push_refused")
        .map(|a| a.detail.as_str())
        .collect();
    assert_eq!(
        refused,
        vec![
            "rollback of machine 1 to generation 1: read-only operator (via telnet)",
            "machine 9: read-only operator (target 9 via admin API)",
            "machine 9: read-only operator (target 9 via telnet)",
            "group:dev: read-only operator (target group:dev via admin API)",
            "group:dev: read-only operator (target group:dev via telnet)",
            "machine 1: read-only operator (target 1 via admin API)",
            "machine 1: read-only operator (target 1 via telnet)",
        ]
    );
    assert!(
        !audit
            .iter()
            .any(|a| a.action == "push" || a.action == "rollback"),
        "{audit:?}"
    );
}

#[tokio::test]
async fn an_accepted_push_is_answered_and_audited_alike() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = console(dir.path()).await;
    let svc = AdminService::new(ctx.ops.clone(), CancellationToken::new());
    let mut admin = Console::open(&ctx, "admin").await;
    // Machine 2 is not connected: both pushes stay pending.
    let console = admin.send(&["push 2", "a=1", "."]).await;
    assert!(
        console.contains("450 machine 2 unreachable; generation 1 pending"),
        "{console}"
    );
    let req = pb::PushConfigRequest {
        target: "2".into(),
        content: b"b=2\n".to_vec(),
    };
    let r = svc
        .push_config(request(req, "admin"))
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(r.outcomes.len(), 1, "{r:?}");
    assert_eq!(r.outcomes[0].outcome(), pb::PushOutcome::Pending, "{r:?}");
    assert_eq!(r.outcomes[0].generation, 2, "{r:?}");
    let audit = ctx.ops.store.audit().list(100).await.unwrap();
    let pushes: Vec<&str> = audit
        .iter()
        .filter(|a| a.action == "push")
        .map(|a| a.detail.as_str())
        .collect();
    assert_eq!(
        pushes,
        vec![
            "machine 2 generation 2 (4 bytes): pending",
            "machine 2 generation 1 (4 bytes): pending",
        ]
    );
}

#[test]
fn every_refusal_renders_alike_on_both_front_ends() {
    let store = || StoreError::Task("gone".into());
    // (error, console code, gRPC code): a 5xx refusal is a caller's error on gRPC, a 4xx
    // a transient failure of the SCM.
    let cases = [
        (
            OpError::ReadOnly("viewer".into()),
            ReplyCode::Refused,
            Code::PermissionDenied,
        ),
        (
            OpError::Target(SelectError::UnknownMachine(9)),
            ReplyCode::Refused,
            Code::NotFound,
        ),
        (
            OpError::Target(SelectError::NoMachines),
            ReplyCode::Refused,
            Code::FailedPrecondition,
        ),
        (
            OpError::UnknownMachine(9),
            ReplyCode::Refused,
            Code::NotFound,
        ),
        (
            OpError::NoGeneration {
                machine: 1,
                generation: 7,
            },
            ReplyCode::Refused,
            Code::NotFound,
        ),
        (OpError::Empty, ReplyCode::Syntax, Code::InvalidArgument),
        (
            OpError::TooLarge { size: 65, max: 64 },
            ReplyCode::Refused,
            Code::InvalidArgument,
        ),
        (
            OpError::Store(store()),
            ReplyCode::Failed,
            Code::Unavailable,
        ),
        (OpError::TaskFailed, ReplyCode::Failed, Code::Internal),
    ];
    for (e, reply_code, grpc_code) in cases {
        let what = format!("{e:?}");
        let reply = refusal(&e);
        assert_eq!(reply.code, reply_code, "{what}: {reply}");
        assert!(!reply.text.contains('\n'), "{what}: {reply}");
        let status = op_status(e);
        assert_eq!(status.code(), grpc_code, "{what}: {status:?}");
        let transient = matches!(grpc_code, Code::Unavailable | Code::Internal);
        assert_eq!(reply_code.as_u16() < 500, transient, "{what}");
    }
    let e = OpError::NoGeneration {
        machine: 1,
        generation: 77,
    };
    assert_eq!(
        refusal(&e).to_string(),
        "550 machine 1 has no generation 77; `history 1` lists them"
    );
}
