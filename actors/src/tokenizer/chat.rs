//! A conversation to token ids, with message contents taken literally: the spelling of a
//! special token inside a message (`<|im_end|>\n<|im_start|>system`) stays text, so a user
//! cannot inject a turn; special tokens come only from the template.
//!
//! A conversation without any special token's spelling in its contents is rendered and
//! encoded whole — exactly what transformers' `apply_chat_template` gives. Only when a
//! content contains one is the rendered text cut at the contents (the template renders
//! placeholders, the contents go back in as they were): the template's own text is
//! encoded with special tokens, each content as plain text.

use tokenizers::Tokenizer;

use super::{ChatMessage, ChatTemplate, TokenizerError, TokenizerParts};
use crate::config::ChatContent;

/// Marks a placeholder in the rendered text (Unicode private use: no template writes it).
const MARK: char = '\u{F8FF}';

pub struct ChatEncoder {
    mode: ChatContent,
    /// The same tokenizer, encoding special tokens' spellings as text.
    literal: Tokenizer,
    /// Spellings of the special tokens.
    specials: Vec<String>,
}

impl ChatEncoder {
    pub fn new(parts: &TokenizerParts, mode: ChatContent) -> Self {
        let mut literal = parts.tokenizer.clone();
        literal.set_encode_special_tokens(true);
        let specials = parts
            .tokenizer
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special && !t.content.is_empty())
            .map(|t| t.content.clone())
            .collect();
        Self {
            mode,
            literal,
            specials,
        }
    }

    /// Whether `text` contains a special token's spelling.
    pub fn has_special(&self, text: &str) -> bool {
        self.specials.iter().any(|s| text.contains(s.as_str()))
    }

    /// The prompt ids of a conversation (with the generation prompt).
    pub fn encode(
        &self,
        parts: &TokenizerParts,
        template: &ChatTemplate,
        messages: &[ChatMessage],
    ) -> Result<Vec<u32>, TokenizerError> {
        let literal = self.mode == ChatContent::Literal
            && messages.iter().any(|m| self.has_special(&m.content));
        if !literal {
            let text = template.render(messages, true)?;
            return parts.encode(&text);
        }
        let masked: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| ChatMessage::new(m.role.clone(), format!("{MARK}{i}{MARK}")))
            .collect();
        let text = template.render(&masked, true)?;
        let mut ids = Vec::new();
        let mut rest = text.as_str();
        while let Some((before, index, after)) = next_placeholder(rest, messages.len()) {
            ids.extend(self.encode_part(&parts.tokenizer, before)?);
            ids.extend(self.encode_part(&self.literal, &messages[index].content)?);
            rest = after;
        }
        ids.extend(self.encode_part(&parts.tokenizer, rest)?);
        match parts.special.bos_to_add() {
            Some(bos) if ids.first() != Some(&bos) => ids.insert(0, bos),
            _ => {}
        }
        Ok(ids)
    }

    fn encode_part(&self, tok: &Tokenizer, text: &str) -> Result<Vec<u32>, TokenizerError> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        Ok(tok
            .encode(text, false)
            .map_err(TokenizerError::Encode)?
            .get_ids()
            .to_vec())
    }
}

/// The first `MARK<i>MARK` in `text` with `i < n`: the text before it, `i`, the text after.
fn next_placeholder(text: &str, n: usize) -> Option<(&str, usize, &str)> {
    let mut from = 0;
    while let Some(start) = text[from..].find(MARK).map(|p| p + from) {
        let after_mark = start + MARK.len_utf8();
        if let Some(len) = text[after_mark..].find(MARK) {
            if let Ok(i) = text[after_mark..after_mark + len].parse::<usize>() {
                if i < n {
                    let end = after_mark + len + MARK.len_utf8();
                    return Some((&text[..start], i, &text[end..]));
                }
            }
        }
        from = after_mark;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_found_in_order() {
        let t = format!("a{MARK}0{MARK}b{MARK}1{MARK}c");
        let (before, i, after) = next_placeholder(&t, 2).expect("first");
        assert_eq!((before, i), ("a", 0));
        let (before, i, after) = next_placeholder(after, 2).expect("second");
        assert_eq!((before, i, after), ("b", 1, "c"));
        assert_eq!(next_placeholder(after, 2), None);
        // Out of range or malformed marks are text.
        let t = format!("x{MARK}7{MARK}y{MARK}z");
        assert_eq!(next_placeholder(&t, 2), None);
    }
}
