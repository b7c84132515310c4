//! The Avro decoders of NATS requests: 19/EPMMP, 20/EFMP and 16/ECAP requests (server side)
//! and responses (client side), 9/ELCE `connected`, the 18/EFE, 16/ECAP token and 21/TLE
//! events. Input: one byte
//! choosing the message type, then the raw Avro datum.
//!
//! Invariants: no panic, bounded memory whatever a length prefix claims; a decoded
//! message encodes back to a datum that decodes to the same message.
#![no_main]

use epr_events::{connectivity, ecap, efe, efmp, epmmp, tenant};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let n_epmmp = epmmp::RequestType::ALL.len();
    let n_efmp = efmp::RequestType::ALL.len();
    let n_ecap = ecap::RequestType::ALL.len();
    let mut s = usize::from(selector) % (2 * n_epmmp + 2 * n_efmp + 2 * n_ecap + 2 + 1 + 5 + 2);
    if s < n_epmmp {
        let t = epmmp::RequestType::ALL[s];
        let _ = epmmp::decode_request_envelope(t, payload);
        if let Ok((env, req)) = epmmp::decode_request(t, payload) {
            let again = epmmp::encode_request(&env, &req).expect("a decoded request encodes");
            assert_eq!(
                epmmp::decode_request(t, &again).expect("re-decodes"),
                (env, req)
            );
        }
        return;
    }
    s -= n_epmmp;
    if s < n_epmmp {
        let t = epmmp::RequestType::ALL[s];
        if let Ok((env, status, resp)) = epmmp::decode_response(t, payload) {
            let again = epmmp::encode_response(&env, &status, &resp).expect("encodes");
            assert_eq!(
                epmmp::decode_response(t, &again).expect("re-decodes"),
                (env, status, resp)
            );
        }
        return;
    }
    s -= n_epmmp;
    if s < n_efmp {
        let t = efmp::RequestType::ALL[s];
        let _ = efmp::decode_request_envelope(t, payload);
        if let Ok((env, req)) = efmp::decode_request(t, payload) {
            let again = efmp::encode_request(&env, &req).expect("a decoded request encodes");
            assert_eq!(
                efmp::decode_request(t, &again).expect("re-decodes"),
                (env, req)
            );
        }
        return;
    }
    s -= n_efmp;
    if s < n_efmp {
        let t = efmp::RequestType::ALL[s];
        if let Ok((env, status, resp)) = efmp::decode_response(t, payload) {
            let again = efmp::encode_response(&env, &status, &resp).expect("encodes");
            assert_eq!(
                efmp::decode_response(t, &again).expect("re-decodes"),
                (env, status, resp)
            );
        }
        return;
    }
    s -= n_efmp;
    if s < n_ecap {
        let t = ecap::RequestType::ALL[s];
        let _ = ecap::decode_request_envelope(t, payload);
        if let Ok((env, req)) = ecap::decode_request(t, payload) {
            let again = ecap::encode_request(&env, &req).expect("a decoded request encodes");
            assert_eq!(
                ecap::decode_request(t, &again).expect("re-decodes"),
                (env, req)
            );
        }
        return;
    }
    s -= n_ecap;
    if s < n_ecap {
        let t = ecap::RequestType::ALL[s];
        if let Ok((env, status, resp)) = ecap::decode_response(t, payload) {
            let again = ecap::encode_response(&env, &status, &resp).expect("encodes");
            assert_eq!(
                ecap::decode_response(t, &again).expect("re-decodes"),
                (env, status, resp)
            );
        }
        return;
    }
    s -= n_ecap;
    if s < 2 {
        if s == 0 {
            let _ = ecap::decode_revoked(payload);
        } else {
            let _ = ecap::decode_status_changed(payload);
        }
        return;
    }
    s -= 2;
    match s {
        0 => {
            if let Ok(ev) = connectivity::decode_connected(payload) {
                let again = connectivity::encode_connected(&ev).expect("encodes");
                assert_eq!(
                    connectivity::decode_connected(&again).expect("re-decodes"),
                    ev
                );
            }
        }
        1..=3 => {
            let _ = efe::decode_filter_status(efe::FilterEventKind::ALL[s - 1], payload);
        }
        4 | 5 => {
            let _ = efe::decode_endpoint_filter(s == 4, payload);
        }
        _ => {
            let kind = tenant::TenantEventKind::ALL[s - 6];
            if let Ok(ev) = tenant::decode_tenant_event(kind, payload) {
                let again = tenant::encode_tenant_event(kind, &ev).expect("encodes");
                assert_eq!(
                    tenant::decode_tenant_event(kind, &again).expect("re-decodes"),
                    ev
                );
            }
        }
    }
});
