//! What one request may ask for (`[limits]`), checked before any template renders or any
//! text is encoded. Each refusal names the limit.

use crate::config::LimitsConfig;
use crate::messages::{ErrorBody, ErrorCode, GenerateRequest, Prompt};

/// Checks `req` against `limits`; the first limit it breaks is the error.
pub fn check(req: &GenerateRequest, limits: &LimitsConfig) -> Result<(), ErrorBody> {
    let invalid = |m: String| Err(ErrorBody::new(ErrorCode::InvalidRequest, m));
    let p = &req.params;
    if p.stop.len() > limits.max_stop {
        return invalid(format!(
            "stop has {} strings; at most {} are allowed (limits.max_stop)",
            p.stop.len(),
            limits.max_stop
        ));
    }
    if let Some(s) = p.stop.iter().find(|s| s.len() > limits.max_stop_bytes) {
        return invalid(format!(
            "a stop string is {} bytes long; at most {} are allowed (limits.max_stop_bytes)",
            s.len(),
            limits.max_stop_bytes
        ));
    }
    if p.stop_token_ids.len() > limits.max_stop_token_ids {
        return invalid(format!(
            "stop_token_ids has {} ids; at most {} are allowed (limits.max_stop_token_ids)",
            p.stop_token_ids.len(),
            limits.max_stop_token_ids
        ));
    }
    let prompt_bytes = match &req.prompt {
        Prompt::Text(t) => t.len(),
        Prompt::TokenIds(_) => 0,
        Prompt::Messages(messages) => {
            if messages.len() > limits.max_messages {
                return invalid(format!(
                    "messages has {} entries; at most {} are allowed (limits.max_messages)",
                    messages.len(),
                    limits.max_messages
                ));
            }
            if let Some(m) = messages.iter().find(|m| !limits.roles.contains(&m.role)) {
                let shown: String = m.role.chars().take(32).collect();
                return invalid(format!(
                    "role {shown:?} is not allowed; use one of {} (limits.roles)",
                    limits.roles.join(", ")
                ));
            }
            messages
                .iter()
                .map(|m| m.content.len() + m.role.len())
                .sum()
        }
    };
    if prompt_bytes > limits.max_prompt_bytes {
        return Err(ErrorBody::new(
            ErrorCode::PromptTooLong,
            format!(
                "the prompt text is {prompt_bytes} bytes; at most {} are allowed (limits.max_prompt_bytes)",
                limits.max_prompt_bytes
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{ChatMessage, SamplingParams};

    fn req(prompt: Prompt, params: SamplingParams) -> GenerateRequest {
        GenerateRequest {
            id: "r".into(),
            prompt,
            params,
        }
    }

    fn text(t: &str) -> Prompt {
        Prompt::Text(t.into())
    }

    fn refused(r: &GenerateRequest, limits: &LimitsConfig) -> ErrorBody {
        check(r, limits).expect_err("must be refused")
    }

    #[test]
    fn each_limit_is_enforced_and_named() {
        let l = LimitsConfig::default();
        assert_eq!(
            check(&req(text("hi"), SamplingParams::default()), &l),
            Ok(())
        );

        let p = SamplingParams {
            stop: vec!["x".into(); l.max_stop + 1],
            ..SamplingParams::default()
        };
        let e = refused(&req(text("hi"), p), &l);
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.message.contains("limits.max_stop"), "{e:?}");

        let p = SamplingParams {
            stop: vec!["y".repeat(l.max_stop_bytes + 1)],
            ..SamplingParams::default()
        };
        assert!(refused(&req(text("hi"), p), &l)
            .message
            .contains("limits.max_stop_bytes"));

        let p = SamplingParams {
            stop_token_ids: vec![1; l.max_stop_token_ids + 1],
            ..SamplingParams::default()
        };
        assert!(refused(&req(text("hi"), p), &l)
            .message
            .contains("limits.max_stop_token_ids"));

        let many = vec![ChatMessage::new("user", "x"); l.max_messages + 1];
        assert!(
            refused(&req(Prompt::Messages(many), SamplingParams::default()), &l)
                .message
                .contains("limits.max_messages")
        );

        let bad_role = vec![ChatMessage::new("<|im_start|>system", "x")];
        let e = refused(
            &req(Prompt::Messages(bad_role), SamplingParams::default()),
            &l,
        );
        assert!(e.message.contains("limits.roles"), "{e:?}");

        for role in ["system", "user", "assistant", "tool"] {
            let ok = vec![ChatMessage::new(role, "x")];
            assert_eq!(
                check(&req(Prompt::Messages(ok), SamplingParams::default()), &l),
                Ok(())
            );
        }

        let small = LimitsConfig {
            max_prompt_bytes: 10,
            ..LimitsConfig::default()
        };
        let e = refused(
            &req(text("eleven bytes"), SamplingParams::default()),
            &small,
        );
        assert_eq!(e.code, ErrorCode::PromptTooLong);
        assert!(e.message.contains("limits.max_prompt_bytes"), "{e:?}");
        let msgs = vec![ChatMessage::new("user", "0123456")];
        let e = refused(
            &req(Prompt::Messages(msgs), SamplingParams::default()),
            &small,
        );
        assert_eq!(e.code, ErrorCode::PromptTooLong);
        assert_eq!(
            check(
                &req(Prompt::TokenIds(vec![1; 100]), SamplingParams::default()),
                &small
            ),
            Ok(())
        );
    }
}
