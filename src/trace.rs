//! W3C Trace Context: a `traceparent` (and `tracestate`) given to Publish is stored with the
//! event and sent on every delivery attempt as a child span (same trace id, a new span id per
//! attempt), so a receiver's trace joins the publisher's.

/// The trace context of a published event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// `00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`.
    pub traceparent: String,
    /// Vendor data, passed on unchanged (at most 512 characters are kept).
    pub tracestate: Option<String>,
}

/// Longest `tracestate` kept (W3C allows 32 members; 512 characters is the floor vendors must
/// propagate).
const MAX_TRACESTATE: usize = 512;

impl TraceContext {
    /// A context from the headers of a call; `None` if `traceparent` is absent or malformed
    /// (W3C: an invalid `traceparent` is ignored, and `tracestate` with it).
    pub fn from_headers(traceparent: Option<&str>, tracestate: Option<&str>) -> Option<Self> {
        let traceparent = traceparent?.trim().to_ascii_lowercase();
        parse(&traceparent)?;
        let tracestate = tracestate
            .map(str::trim)
            .filter(|state| !state.is_empty() && state.len() <= MAX_TRACESTATE)
            .map(str::to_string);
        Some(TraceContext {
            traceparent,
            tracestate,
        })
    }

    /// The `traceparent` of one delivery attempt: the same trace and flags, a new span id.
    pub fn child(&self) -> String {
        let (trace_id, flags) = parse(&self.traceparent).expect("validated when made");
        let span: u64 = loop {
            let span = rand::random::<u64>();
            if span != 0 {
                break span;
            }
        };
        format!("00-{trace_id}-{span:016x}-{flags}")
    }
}

impl TraceContext {
    /// The context as OpenTelemetry's, to parent Herald's own spans on the publisher's.
    pub fn otel_context(&self) -> opentelemetry::Context {
        use opentelemetry::propagation::TextMapPropagator;
        let mut carrier = std::collections::HashMap::new();
        carrier.insert("traceparent".to_string(), self.traceparent.clone());
        if let Some(state) = &self.tracestate {
            carrier.insert("tracestate".to_string(), state.clone());
        }
        opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier)
    }

    /// Makes the publisher's span the parent of `span`, when spans are exported (a span that
    /// is not recorded costs nothing here).
    pub fn parent(&self, span: &tracing::Span) {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        if !span.is_disabled() {
            let _ = span.set_parent(self.otel_context());
        }
    }

    /// The `traceparent` of an attempt made in `span`: its own span id when spans are
    /// exported (so the receiver's spans hang under Herald's attempt span), else a new one.
    pub fn child_of(&self, span: &tracing::Span) -> String {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        if span.is_disabled() {
            return self.child();
        }
        let context = span.context();
        let own = context.span().span_context().clone();
        if own.is_valid()
            && parse(&self.traceparent).map(|(trace, _)| trace)
                == Some(own.trace_id().to_string().as_str())
        {
            return format!(
                "00-{}-{}-{:02x}",
                own.trace_id(),
                own.span_id(),
                own.trace_flags().to_u8()
            );
        }
        self.child()
    }
}

/// The trace id and flags of a valid version-00 `traceparent`.
fn parse(traceparent: &str) -> Option<(&str, &str)> {
    let mut parts = traceparent.split('-');
    let (version, trace_id, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |text: &str, length: usize| {
        text.len() == length && text.bytes().all(|byte| byte.is_ascii_hexdigit())
    };
    let valid = version == "00"
        && parts.next().is_none()
        && hex(trace_id, 32)
        && trace_id.bytes().any(|byte| byte != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|byte| byte != b'0')
        && hex(flags, 2);
    valid.then_some((trace_id, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_gives_children_in_the_same_trace() {
        let context = TraceContext::from_headers(
            Some("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            Some("congo=t61rcWkgMzE"),
        )
        .unwrap();
        let child = context.child();
        assert!(
            child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{child}"
        );
        assert!(child.ends_with("-01"));
        assert_ne!(child, context.traceparent);
        assert_ne!(child, context.child(), "a new span per attempt");
        assert_eq!(context.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::from_headers(Some(bad), None), None, "{bad}");
        }
    }
}
