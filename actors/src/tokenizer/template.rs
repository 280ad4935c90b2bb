//! Chat templates, rendered as transformers renders them.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value as JValue, ValueKind};
use minijinja::{Environment, ErrorKind, State};

use super::*;

// ---------------------------------------------------------------------------------------------
// Chat templates
// ---------------------------------------------------------------------------------------------

/// The template used when a model ships none: ChatML (`<|im_start|>role\ncontent<|im_end|>\n`
/// per message, then `<|im_start|>assistant\n` for the generation prompt) — transformers' old
/// default. Models not trained on ChatML will see unfamiliar markers; serving such a model
/// should configure a template.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template, rendered as transformers' `apply_chat_template` renders it:
/// jinja2 with `trim_blocks` and `lstrip_blocks`; the variables `messages`,
/// `add_generation_prompt`, `bos_token`, `eos_token`, `tools` (none) and `documents` (none);
/// the function `raise_exception(msg)`; a `tojson` filter that writes what Python's
/// `json.dumps` writes (`ensure_ascii=False`, `indent`, `sort_keys`); and the Python methods
/// templates call on strings (`strip`, `startswith`, `split`, ...) and dicts (`items`, `get`, ...).
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// The error `raise_exception` attaches, so a render failure it caused is told apart.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

impl ChatTemplate {
    /// Compiles `source`; a template minijinja cannot parse is a
    /// [`TokenizerError::TemplateSyntax`].
    pub fn new(
        source: &str,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(python_method);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        // jinja2 prints Python's `None`; minijinja would print `none`.
        env.set_formatter(|out, state, value| {
            if value.is_none() {
                out.write_str("None").map_err(minijinja::Error::from)
            } else {
                minijinja::escape_formatter(out, state, value)
            }
        });
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(TokenizerError::TemplateSyntax)?;
        Ok(Self {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The ChatML fallback ([`CHATML_TEMPLATE`]).
    pub fn chatml(
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, TokenizerError> {
        Self::new(CHATML_TEMPLATE, bos_token, eos_token)
    }

    /// Renders the conversation; `add_generation_prompt` appends the assistant turn's opening.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(TokenizerError::TemplateRender)?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            tools => JValue::from(()),
            documents => JValue::from(()),
        };
        template.render(ctx).map_err(|err| {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
            while let Some(e) = source {
                if let Some(raised) = e.downcast_ref::<RaisedByTemplate>() {
                    return TokenizerError::TemplateRaised(raised.0.clone());
                }
                source = e.source();
            }
            TokenizerError::TemplateRender(err)
        })
    }
}

fn raise_exception(message: String) -> Result<JValue, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(RaisedByTemplate(message)),
    )
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, as transformers defines its `tojson` filter.
fn tojson(value: &JValue, kwargs: Kwargs) -> Result<JValue, minijinja::Error> {
    let indent: Option<JValue> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<JValue> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_owned()),
            None => Some(" ".repeat(v.as_usize().ok_or_else(|| {
                minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: bad indent")
            })?)),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(seps) if !seps.is_none() && !seps.is_undefined() => {
            let item = seps.get_item_by_index(0)?;
            let key = seps.get_item_by_index(1)?;
            (item.to_string(), key.to_string())
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let mut writer = PyJson {
        out: String::new(),
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    writer.value(value, 0)?;
    Ok(JValue::from_safe_string(writer.out))
}

struct PyJson {
    out: String,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&mut self, depth: usize) {
        if let Some(indent) = &self.indent {
            self.out.push('\n');
            for _ in 0..depth {
                self.out.push_str(indent);
            }
        }
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(self.out, "\\u{unit:04x}");
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }

    fn value(&mut self, value: &JValue, depth: usize) -> Result<(), minijinja::Error> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                let text = serde_json::to_string(value).map_err(|e| {
                    minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string())
                })?;
                self.out.push_str(&text);
            }
            ValueKind::String => self.string(value.as_str().unwrap_or_default()),
            ValueKind::Map => {
                let mut keys: Vec<JValue> = value.try_iter()?.collect();
                if keys.is_empty() {
                    self.out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                self.out.push('{');
                for (i, key) in keys.iter().enumerate() {
                    if i > 0 {
                        let sep = self.item_sep.clone();
                        self.out.push_str(&sep);
                    }
                    self.newline(depth + 1);
                    self.string(&key.to_string());
                    let sep = self.key_sep.clone();
                    self.out.push_str(&sep);
                    self.value(&value.get_item(key)?, depth + 1)?;
                }
                self.newline(depth);
                self.out.push('}');
            }
            _ => {
                let items: Vec<JValue> = value.try_iter()?.collect();
                if items.is_empty() {
                    self.out.push_str("[]");
                    return Ok(());
                }
                self.out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        let sep = self.item_sep.clone();
                        self.out.push_str(&sep);
                    }
                    self.newline(depth + 1);
                    self.value(item, depth + 1)?;
                }
                self.newline(depth);
                self.out.push(']');
            }
        }
        Ok(())
    }
}

fn str_arg(args: &[JValue], i: usize) -> Option<&str> {
    args.get(i).and_then(|v| v.as_str())
}

/// Python's `str.split(sep=None, maxsplit=-1)`.
fn py_split(s: &str, sep: Option<&str>, maxsplit: Option<usize>) -> Vec<JValue> {
    let max = maxsplit.unwrap_or(usize::MAX);
    match sep {
        Some(sep) => {
            if max == usize::MAX {
                s.split(sep).map(JValue::from).collect()
            } else {
                s.splitn(max.saturating_add(1), sep)
                    .map(JValue::from)
                    .collect()
            }
        }
        None => {
            let mut out = Vec::new();
            let mut rest = s.trim_start();
            while !rest.is_empty() {
                if out.len() == max {
                    out.push(JValue::from(rest));
                    break;
                }
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                out.push(JValue::from(&rest[..end]));
                rest = rest[end..].trim_start();
            }
            out
        }
    }
}

/// A prefix argument of `startswith` / `endswith`: a string or a tuple (list) of strings.
fn any_affix(arg: Option<&JValue>, test: impl Fn(&str) -> bool) -> Result<bool, minijinja::Error> {
    let Some(arg) = arg else {
        return Err(minijinja::Error::new(
            ErrorKind::MissingArgument,
            "startswith/endswith needs an argument",
        ));
    };
    if let Some(s) = arg.as_str() {
        return Ok(test(s));
    }
    Ok(arg.try_iter()?.any(|v| v.as_str().is_some_and(&test)))
}

/// The Python `str` and `dict` methods chat templates call that minijinja lacks.
fn python_method(
    _state: &State,
    value: &JValue,
    method: &str,
    args: &[JValue],
) -> Result<JValue, minijinja::Error> {
    let unknown = || {
        Err(minijinja::Error::new(
            ErrorKind::UnknownMethod,
            format!("{} has no method named {method}", value.kind()),
        ))
    };
    match value.kind() {
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            let chars = str_arg(args, 0).map(|c| c.chars().collect::<Vec<_>>());
            let strip_set = |c: char| match &chars {
                Some(set) => set.contains(&c),
                None => c.is_whitespace(),
            };
            Ok(match method {
                "strip" => JValue::from(s.trim_matches(strip_set)),
                "lstrip" => JValue::from(s.trim_start_matches(strip_set)),
                "rstrip" => JValue::from(s.trim_end_matches(strip_set)),
                "upper" => JValue::from(s.to_uppercase()),
                "lower" => JValue::from(s.to_lowercase()),
                "capitalize" => {
                    let mut it = s.chars();
                    let first = it.next().map(|c| c.to_uppercase().collect::<String>());
                    JValue::from(first.unwrap_or_default() + &it.as_str().to_lowercase())
                }
                "title" => {
                    let mut out = String::with_capacity(s.len());
                    let mut prev_cased = false;
                    for c in s.chars() {
                        if prev_cased {
                            out.extend(c.to_lowercase());
                        } else {
                            out.extend(c.to_uppercase());
                        }
                        prev_cased = c.is_alphabetic();
                    }
                    JValue::from(out)
                }
                "startswith" => JValue::from(any_affix(args.first(), |p| s.starts_with(p))?),
                "endswith" => JValue::from(any_affix(args.first(), |p| s.ends_with(p))?),
                "split" => {
                    let maxsplit = args
                        .get(1)
                        .and_then(|v| v.as_i64())
                        .and_then(|m| usize::try_from(m).ok());
                    JValue::from(py_split(s, str_arg(args, 0), maxsplit))
                }
                "splitlines" => JValue::from(s.lines().map(JValue::from).collect::<Vec<_>>()),
                "replace" => {
                    let (Some(old), Some(new)) = (str_arg(args, 0), str_arg(args, 1)) else {
                        return Err(minijinja::Error::new(
                            ErrorKind::MissingArgument,
                            "replace(old, new[, count])",
                        ));
                    };
                    match args.get(2).and_then(|v| v.as_i64()) {
                        Some(n) if n >= 0 => {
                            JValue::from(s.replacen(old, new, usize::try_from(n).unwrap_or(0)))
                        }
                        _ => JValue::from(s.replace(old, new)),
                    }
                }
                "find" => {
                    let sub = str_arg(args, 0).unwrap_or_default();
                    JValue::from(
                        s.find(sub)
                            .map(|byte| s[..byte].chars().count() as i64)
                            .unwrap_or(-1),
                    )
                }
                "count" => JValue::from(s.matches(str_arg(args, 0).unwrap_or_default()).count()),
                "join" => {
                    let Some(items) = args.first() else {
                        return unknown();
                    };
                    let parts: Vec<String> = items.try_iter()?.map(|v| v.to_string()).collect();
                    JValue::from(parts.join(s))
                }
                "isdigit" => JValue::from(!s.is_empty() && s.chars().all(|c| c.is_ascii_digit())),
                "isalpha" => JValue::from(!s.is_empty() && s.chars().all(char::is_alphabetic)),
                "isalnum" => JValue::from(!s.is_empty() && s.chars().all(char::is_alphanumeric)),
                "isspace" => JValue::from(!s.is_empty() && s.chars().all(char::is_whitespace)),
                "islower" => JValue::from(
                    s.chars().any(char::is_lowercase) && !s.chars().any(char::is_uppercase),
                ),
                "isupper" => JValue::from(
                    s.chars().any(char::is_uppercase) && !s.chars().any(char::is_lowercase),
                ),
                _ => return unknown(),
            })
        }
        ValueKind::Map => match method {
            "items" => Ok(JValue::from(
                value
                    .try_iter()?
                    .map(|k| {
                        let v = value.get_item(&k).unwrap_or_default();
                        JValue::from(vec![k, v])
                    })
                    .collect::<Vec<_>>(),
            )),
            "keys" => Ok(JValue::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => Ok(JValue::from(
                value
                    .try_iter()?
                    .map(|k| value.get_item(&k).unwrap_or_default())
                    .collect::<Vec<_>>(),
            )),
            "get" => {
                let Some(key) = args.first() else {
                    return unknown();
                };
                let found = value.get_item(key)?;
                Ok(if found.is_undefined() {
                    args.get(1).cloned().unwrap_or(JValue::from(()))
                } else {
                    found
                })
            }
            _ => unknown(),
        },
        _ => unknown(),
    }
}
