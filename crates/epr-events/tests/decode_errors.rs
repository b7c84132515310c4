//! Whatever arrives on NATS, the decoders return an error instead of panicking.

use epr_events::connectivity::decode_connected;
use epr_events::ecap;
use epr_events::efe::{self, EndpointFilterEvent, FilterEventKind, FilterStatusEvent};
use epr_events::efmp;
use epr_events::epmmp::{
    decode_request, decode_request_envelope, decode_response, encode_request, Envelope,
    KeyUpdateCommand, Request, RequestType,
};
use epr_events::tenant::{decode_tenant_event, TenantEventKind};
use epr_events::{DecodeError, Originator};
use proptest::prelude::*;

/// Runs every decoder of the crate on `bytes`; returns how many succeeded.
fn decode_everything(bytes: &[u8]) -> usize {
    let mut ok = usize::from(decode_connected(bytes).is_ok());
    for t in RequestType::ALL {
        ok += usize::from(decode_request(t, bytes).is_ok());
        ok += usize::from(decode_request_envelope(t, bytes).is_ok());
        ok += usize::from(decode_response(t, bytes).is_ok());
    }
    for t in efmp::RequestType::ALL {
        ok += usize::from(efmp::decode_request(t, bytes).is_ok());
        ok += usize::from(efmp::decode_request_envelope(t, bytes).is_ok());
        ok += usize::from(efmp::decode_response(t, bytes).is_ok());
    }
    for kind in FilterEventKind::ALL {
        ok += usize::from(efe::decode_filter_status(kind, bytes).is_ok());
    }
    for matched in [true, false] {
        ok += usize::from(efe::decode_endpoint_filter(matched, bytes).is_ok());
    }
    for kind in TenantEventKind::ALL {
        ok += usize::from(decode_tenant_event(kind, bytes).is_ok());
    }
    for t in ecap::RequestType::ALL {
        ok += usize::from(ecap::decode_request(t, bytes).is_ok());
        ok += usize::from(ecap::decode_request_envelope(t, bytes).is_ok());
        ok += usize::from(ecap::decode_response(t, bytes).is_ok());
    }
    ok += usize::from(ecap::decode_revoked(bytes).is_ok());
    ok += usize::from(ecap::decode_status_changed(bytes).is_ok());
    ok
}

#[test]
fn garbage_is_an_error_everywhere() {
    for garbage in [
        &b""[..],
        &[0xff; 32],
        &[0x80; 12], // a varint that never ends
        &[0x01],     // length -1
        b"Obj\x01 an Avro container header",
        &[0xc3, 0x01, 1, 2, 3, 4, 5, 6, 7, 8], // single-object marker
        &[0xfe, 0xff, 0xff, 0xff, 0x0f],       // a huge string length
    ] {
        assert_eq!(decode_everything(garbage), 0, "{garbage:?}");
    }
    let err = decode_connected(&[0xff; 32]).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::Malformed { .. } | DecodeError::Truncated { .. }
        ),
        "{err}"
    );
}

fn text() -> impl Strategy<Value = String> {
    // Includes multi-byte characters and the empty string.
    "\\PC{0,12}"
}

fn request() -> impl Strategy<Value = Request> {
    let bytes = || proptest::collection::vec(any::<u8>(), 0..16);
    let texts = || proptest::collection::vec(text(), 0..4);
    prop_oneof![
        (text(), texts(), any::<bool>()).prop_map(|(endpoint_id, include, include_metadata)| {
            Request::MetadataGet {
                endpoint_id,
                include,
                include_metadata,
            }
        }),
        (text(), proptest::option::of(text()), bytes()).prop_map(
            |(endpoint_id, if_match, patch)| Request::MetadataPatch {
                endpoint_id,
                if_match,
                patch,
            }
        ),
        (text(), text(), bytes()).prop_map(|(endpoint_id, key, value)| Request::KeyUpdate {
            endpoint_id,
            key,
            value,
        }),
        proptest::collection::vec(
            (text(), text(), bytes()).prop_map(|(endpoint_id, key, value)| KeyUpdateCommand {
                endpoint_id,
                key,
                value,
            }),
            0..4
        )
        .prop_map(|commands| Request::KeyBatchUpdate { commands }),
        text().prop_map(|endpoint_id| Request::KeysGet { endpoint_id }),
        texts().prop_map(|endpoint_ids| Request::AppVersionsGet { endpoint_ids }),
    ]
}

/// Valid 18/EFE and 20/EFMP datums, to corrupt.
fn filter_message() -> impl Strategy<Value = Vec<u8>> {
    let origin = || Originator {
        instance_name: "epr".into(),
        replica_id: "r".into(),
    };
    let env = || efmp::Envelope {
        correlation_id: "c".into(),
        timestamp: 1,
        timeout: 0,
    };
    let status = (
        prop::sample::select(FilterEventKind::ALL.to_vec()),
        text(),
        proptest::option::of(text()),
    )
        .prop_map(move |(kind, application_name, filter_name)| {
            let ev = FilterStatusEvent {
                correlation_id: "c".into(),
                timestamp: 1,
                filter_id: "f".into(),
                application_name,
                filter_name,
                kind,
            };
            efe::encode_filter_status(&ev, &origin()).unwrap().payload
        });
    let endpoint = (any::<bool>(), text(), proptest::option::of(text()), text()).prop_map(
        move |(matched, app_version_name, filter_name, endpoint_id)| {
            let ev = EndpointFilterEvent {
                correlation_id: "c".into(),
                timestamp: 1,
                filter_id: "f".into(),
                application_name: "a".into(),
                app_version_name,
                filter_name,
                endpoint_id,
                matched,
            };
            efe::encode_endpoint_filter(&ev, &origin()).unwrap().payload
        },
    );
    let request = (any::<bool>(), text()).prop_map(move |(by_filter, id)| {
        let req = if by_filter {
            efmp::Request::ListByFilter { filter_id: id }
        } else {
            efmp::Request::EndpointFilters { endpoint_id: id }
        };
        efmp::encode_request(&env(), &req).unwrap()
    });
    let response = (
        text(),
        proptest::collection::btree_map(text(), proptest::collection::vec(text(), 0..3), 0..3),
    )
        .prop_map(move |(filter_id, app_versions_to_endpoints)| {
            let body = efmp::Response::ListByFilter {
                filter_id,
                app_versions_to_endpoints,
            };
            efmp::encode_response(&env(), &efmp::Status::OK, &body).unwrap()
        });
    prop_oneof![status, endpoint, request, response]
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        decode_everything(&bytes);
    }

    /// Valid datums with arbitrary bytes spliced in: gets past the first fields more often
    /// than pure noise does.
    #[test]
    fn corrupted_requests_never_panic(
        req in request(),
        at in any::<prop::sample::Index>(),
        noise in proptest::collection::vec(any::<u8>(), 1..12),
    ) {
        let env = Envelope { correlation_id: "c".into(), timestamp: 1, timeout: 0 };
        let mut payload = encode_request(&env, &req).unwrap();
        let at = at.index(payload.len() + 1);
        payload.splice(at..at, noise);
        decode_everything(&payload);
    }

    #[test]
    fn corrupted_filter_messages_never_panic(
        mut payload in filter_message(),
        at in any::<prop::sample::Index>(),
        noise in proptest::collection::vec(any::<u8>(), 1..12),
    ) {
        let at = at.index(payload.len() + 1);
        payload.splice(at..at, noise);
        decode_everything(&payload);
    }

    #[test]
    fn arbitrary_requests_round_trip(
        req in request(),
        correlation_id in text(),
        timestamp in any::<i64>(),
        timeout in any::<i64>(),
    ) {
        let env = Envelope { correlation_id, timestamp, timeout };
        let payload = encode_request(&env, &req).unwrap();
        prop_assert_eq!(decode_request(req.request_type(), &payload).unwrap(), (env, req));
    }
}
