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
    console_with(dir, |_| {}).await
}

/// [`console`], with the configuration changed by `change` first.
async fn console_with(
    dir: &std::path::Path,
    change: impl FnOnce(&mut ScmConfig),
) -> Arc<TelnetContext> {
    let r = crate::app::initdev::init_dev(dir, &[1, 2]).expect("init-dev");
    let mut cfg = ScmConfig::load(&r.scm_config, &Default::default()).expect("config");
    change(&mut cfg);
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
        Console::open_until(ctx, operator, CancellationToken::new()).await
    }

    /// A session that ends when `shutdown` is cancelled.
    async fn open_until(
        ctx: &Arc<TelnetContext>,
        operator: &str,
        shutdown: CancellationToken,
    ) -> Console {
        let (client, server) = tokio::io::duplex(1 << 16);
        tokio::spawn(crate::front::telnet::serve_logged_in(
            ctx.clone(),
            server,
            peer(),
            operator.to_owned(),
            shutdown,
        ));
        let mut c = Console { io: client };
        let hello = c.until_prompt().await;
        assert!(hello.contains("230 logged in as"), "{hello}");
        c
    }

    /// Everything up to the next prompt.
    async fn until_prompt(&mut self) -> String {
        let got = self.until(crate::front::telnet::PROMPT.as_bytes()).await;
        String::from_utf8_lossy(&got).into_owned()
    }

    /// The bytes up to and including `end` (read byte by byte, so nothing after it is
    /// consumed).
    async fn until(&mut self, end: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 1];
        while !got.ends_with(end) {
            let n = tokio::time::timeout(Duration::from_secs(20), self.io.read(&mut buf))
                .await
                .expect("the console answers")
                .expect("read");
            assert!(n > 0, "console closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    /// Everything until the console closes the session.
    async fn until_closed(&mut self) -> String {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), self.io.read_to_end(&mut got))
            .await
            .expect("the console closes")
            .expect("read");
        String::from_utf8_lossy(&got).into_owned()
    }

    /// Sends bytes as they are.
    async fn raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.expect("write");
    }

    /// `push <target>` up to the 354 line.
    async fn start_push(&mut self, target: &str) {
        self.raw(format!("push {target}\r\n").as_bytes()).await;
        let go = self.until(b"\r\n").await;
        assert!(go.starts_with(b"354 "), "{}", String::from_utf8_lossy(&go));
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

/// What inetutils telnet sends for Ctrl-C: `IAC IP IAC DO TIMING-MARK`.
const CTRL_C: &[u8] = b"\xff\xf4\xff\xfd\x06";
/// The answer to it: `IAC WONT TIMING-MARK`.
const WONT_TM: &[u8] = b"\xff\xfc\x06";

async fn history_len(ctx: &TelnetContext, id: u16) -> usize {
    ctx.ops.store.fleet().history(id, 10).await.unwrap().len()
}

#[tokio::test]
async fn ctrl_c_answers_the_timing_mark_before_anything_else() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = console(dir.path()).await;
    let mut admin = Console::open(&ctx, "admin").await;

    // inetutils discards everything it receives between its IP and the answer to its DO
    // TIMING-MARK: the answer must come first, then the cancellation and the prompt.
    admin.start_push("2").await;
    admin.raw(b"pl=partial\r\n").await;
    admin.raw(CTRL_C).await;
    let got = admin.until_prompt().await;
    let want = format!(
        "{}426 push cancelled; nothing sent\r\nscm> ",
        String::from_utf8_lossy(WONT_TM)
    );
    assert_eq!(got, want);
    // At the prompt too: the mark, then a fresh prompt.
    admin.raw(CTRL_C).await;
    let got = admin.until_prompt().await;
    assert_eq!(
        got,
        format!("{}\r\nscm> ", String::from_utf8_lossy(WONT_TM))
    );
    let got = admin.send(&["machines"]).await;
    assert!(got.contains("250 2 machines"), "{got}");
    assert_eq!(history_len(&ctx, 2).await, 0, "nothing was stored");
}

#[tokio::test]
async fn raw_ctrl_c_and_ctrl_d_cancel_a_push_and_ctrl_d_ends_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = console(dir.path()).await;
    let mut admin = Console::open(&ctx, "admin").await;

    // plink and telnetlib3 send Ctrl-C as the byte 0x03: an interrupt, not text, and
    // what follows it is the next command, not a configuration line.
    admin.start_push("2").await;
    admin.raw(b"pl=partial\r\n\x03machines\r\n").await;
    let got = admin.until_prompt().await;
    assert_eq!(got, "426 push cancelled; nothing sent\r\nscm> ");
    let got = admin.until_prompt().await;
    assert!(got.contains("250 2 machines"), "{got}");

    // Ctrl-D at the start of a body line cancels the push too.
    admin.start_push("2").await;
    admin.raw(b"a=1\r\n\x04").await;
    let got = admin.until_prompt().await;
    assert_eq!(got, "426 push cancelled; nothing sent\r\nscm> ");
    assert_eq!(history_len(&ctx, 2).await, 0, "nothing was stored");

    // At the prompt, Ctrl-D ends the session politely.
    admin.raw(b"\x04").await;
    assert_eq!(admin.until_closed().await, "221 bye\r\n");
}

#[tokio::test]
async fn both_front_ends_refuse_control_bytes_alike() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = console_with(dir.path(), |c| c.limits.max_config_bytes = 4096).await;
    let svc = AdminService::new(ctx.ops.clone(), CancellationToken::new());
    let mut admin = Console::open(&ctx, "admin").await;
    let rule = "configurations are UTF-8 text with TAB as the only control character";
    let cases: [(&[u8], &str); 6] = [
        (
            b"a=1\nb=2\n\x1b[1mc\n",
            "line 3 has control byte 0x1B (ESC)",
        ),
        (b"a=\x00\n", "line 1 has control byte 0x00 (NUL)"),
        (b"ok\nbell=\x07\n", "line 2 has control byte 0x07 (BEL)"),
        (b"eot=\x04\n", "line 1 has control byte 0x04 (EOT)"),
        (b"etx\tok\nx=\x1f\n", "line 2 has control byte 0x1F (US)"),
        (b"a=1\nname=caf\xe9\n", "line 2 is not UTF-8"),
    ];
    for (content, why) in cases {
        admin.start_push("2").await;
        let mut body = Vec::new();
        for l in content.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            body.extend_from_slice(l);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b".\r\n");
        admin.raw(&body).await;
        let console = admin.until_prompt().await;
        let status = grpc_push(&svc, "admin", "2", content).await;
        assert_eq!(
            console,
            format!("552 {why}; {rule}; nothing sent\r\nscm> "),
            "{content:?}"
        );
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(
            status.message(),
            format!("{why}; {rule}; nothing was stored or sent"),
            "{content:?}"
        );
    }
    assert_eq!(history_len(&ctx, 2).await, 0, "nothing was stored");
    // TAB and CR LF line ends are text.
    let console = admin.send(&["push 2", "a\t= 1", "."]).await;
    assert!(console.contains("450 machine 2 unreachable"), "{console}");
}

#[tokio::test]
async fn idle_and_shutdown_are_announced_before_the_session_closes() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = console_with(dir.path(), |c| c.timeouts.telnet_idle_ms = 300).await;
    let mut idle = Console::open(&ctx, "admin").await;
    assert_eq!(
        idle.until_closed().await,
        "421 session idle for 1 s; closing\r\n"
    );
    let mut mid_push = Console::open(&ctx, "admin").await;
    mid_push.start_push("2").await;
    // Idle in the middle of a body as well.
    assert_eq!(
        mid_push.until_closed().await,
        "421 session idle for 1 s; closing\r\n"
    );

    let dir = tempfile::tempdir().unwrap();
    let ctx = console(dir.path()).await;
    let shutdown = CancellationToken::new();
    let mut at_prompt = Console::open_until(&ctx, "admin", shutdown.clone()).await;
    let mut mid_push = Console::open_until(&ctx, "admin", shutdown.clone()).await;
    mid_push.start_push("2").await;
    mid_push.raw(b"a=1\r\n").await;
    // The body line has been read when the session answers an AYT after it.
    mid_push.raw(b"\xff\xf6").await;
    mid_push.until(b"[scm: yes]\r\n").await;
    shutdown.cancel();
    assert_eq!(
        at_prompt.until_closed().await,
        "421 SCM shutting down; closing\r\n"
    );
    assert_eq!(
        mid_push.until_closed().await,
        "421 SCM shutting down; push cancelled, nothing sent; closing\r\n"
    );
    assert_eq!(history_len(&ctx, 2).await, 0, "nothing was stored");
}
