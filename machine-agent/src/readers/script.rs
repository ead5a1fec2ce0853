//! `kind = "script"`: emits the configured cards on a timer, once, then ends.

use std::time::Duration;

use tokio::time::Instant;

use super::line::LineAssembler;
use super::{DEFAULT_INTERVAL_MS, ReaderConfig, Sink};

pub(super) async fn run(cfg: &ReaderConfig, what: &str, sink: &Sink) {
    let id = &sink.id;
    tracing::info!("reader {id} ({what}) started");
    let start = Instant::now();
    let delay = Duration::from_millis(cfg.start_delay_ms.unwrap_or(0));
    let interval = Duration::from_millis(cfg.interval_ms.unwrap_or(DEFAULT_INTERVAL_MS));
    // Typed as a keyboard wedge would: the card, then Enter.
    let mut asm = LineAssembler::new();
    for (i, card) in cfg.cards.iter().enumerate() {
        let steps = u32::try_from(i).unwrap_or(u32::MAX);
        let at = start + delay + interval.saturating_mul(steps);
        tokio::select! {
            _ = sink.shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(at) => {}
        }
        let mut lines = asm.push(card.as_bytes());
        lines.extend(asm.push(b"\n"));
        for line in lines {
            if !sink.send(line).await {
                return;
            }
        }
    }
    tracing::info!("reader {id}: script done ({} cards)", cfg.cards.len());
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    use super::super::{ReaderKind, run as run_reader};
    use super::*;

    fn script(cards: &[&str], interval: Option<u64>, delay: Option<u64>) -> ReaderConfig {
        let mut cfg = ReaderConfig::new("s1", ReaderKind::Script);
        cfg.cards = cards.iter().map(|c| c.to_string()).collect();
        cfg.interval_ms = interval;
        cfg.start_delay_ms = delay;
        cfg
    }

    #[tokio::test(start_paused = true)]
    async fn cards_in_order_at_virtual_times_then_returns() {
        let (tx, mut rx) = mpsc::channel(8);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let task = tokio::spawn(run_reader(
            script(
                &["EMP123", "5678", "ed5d34c74e59d16bd"],
                Some(250),
                Some(1000),
            ),
            tx,
            CancellationToken::new(),
            ms(1),
            ms(2),
        ));
        let mut got = Vec::new();
        while let Some(l) = rx.recv().await {
            got.push((String::from_utf8(l.line).unwrap(), t0.elapsed(), l.reader));
        }
        task.await.unwrap();
        let expect = [
            ("EMP123", 1000),
            ("5678", 1250),
            ("ed5d34c74e59d16bd", 1500),
        ];
        assert_eq!(got.len(), 3);
        for ((line, at, reader), (want, want_ms)) in got.iter().zip(expect) {
            assert_eq!(line, want);
            assert_eq!(reader, "s1");
            // Paused time only moves to the next timer: exact virtual times.
            assert_eq!(*at, ms(want_ms), "{want}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn defaults_and_shutdown() {
        let (tx, mut rx) = mpsc::channel(8);
        let token = CancellationToken::new();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let task = tokio::spawn(run_reader(
            script(&["1", "2", "3"], None, None),
            tx,
            token.clone(),
            ms(1),
            ms(2),
        ));
        assert_eq!(rx.recv().await.unwrap().line, b"1");
        assert_eq!(t0.elapsed(), ms(0));
        assert_eq!(rx.recv().await.unwrap().line, b"2");
        assert_eq!(t0.elapsed(), ms(DEFAULT_INTERVAL_MS));
        token.cancel();
        task.await.unwrap();
        assert!(rx.recv().await.is_none(), "no card after shutdown");
        assert_eq!(t0.elapsed(), ms(DEFAULT_INTERVAL_MS));
    }
}
