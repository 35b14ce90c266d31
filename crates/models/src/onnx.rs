//! ONNX export of BERT encoders ([`crate::cross`]): the few ONNX protobuf messages a graph needs
//! (field numbers from `onnx.proto`), and at opset 17, weights as initializers, with inputs
//! `input_ids`, `attention_mask`, `token_type_ids`, the graphs of
//! - a Hugging Face `BertForSequenceClassification` (output `logits` [batch, 1]): rerankers;
//! - a plain `BertModel` (output `last_hidden_state` [batch, sequence, hidden]): embedders, as
//!   Hugging Face's feature-extraction exports are.

use crate::cross::{BertConfig, LAYER_WEIGHTS};
use crate::ModelError;
use candle_core::Tensor;
use prost::Message;

#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(string, tag = "3")]
    pub producer_version: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
    #[prost(message, repeated, tag = "14")]
    pub metadata_props: Vec<StringStringEntryProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct StringStringEntryProto {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// Metadata key of an export made from a `model.safetensors`: that file's sha256, so that the
/// registry's checksum (of the safetensors) also vouches for the export.
pub const SOURCE_SHA256: &str = "lorag.source_sha256";

/// A model's metadata alone (prost skips the graph without copying it).
#[derive(Clone, PartialEq, Message)]
struct ModelMetadata {
    #[prost(message, repeated, tag = "14")]
    metadata_props: Vec<StringStringEntryProto>,
}

/// The [`SOURCE_SHA256`] an ONNX file records, if it is readable and records one.
pub fn source_sha256(onnx: &[u8]) -> Option<String> {
    let m = ModelMetadata::decode(onnx).ok()?;
    m.metadata_props.into_iter().find(|p| p.key == SOURCE_SHA256).map(|p| p.value)
}

#[derive(Clone, PartialEq, Message)]
pub struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct AttributeProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(float, tag = "2")]
    pub f: f32,
    #[prost(int64, tag = "3")]
    pub i: i64,
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
    /// AttributeType: FLOAT = 1, INT = 2, INTS = 7.
    #[prost(int32, tag = "20")]
    pub r#type: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    /// DataType: FLOAT = 1, INT64 = 7.
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(string, tag = "8")]
    pub name: String,
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TypeProto {
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TypeTensor>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TypeTensor {
    #[prost(int32, tag = "1")]
    pub elem_type: i32,
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Dimension {
    #[prost(int64, optional, tag = "1")]
    pub dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    pub dim_param: Option<String>,
}

const FLOAT: i32 = 1;
const INT64: i32 = 7;

/// A graph under construction: nodes and initializers with generated names.
struct Builder {
    graph: GraphProto,
    next: usize,
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.into(), i, r#type: 2, ..Default::default() }
}
fn attr_float(name: &str, f: f32) -> AttributeProto {
    AttributeProto { name: name.into(), f, r#type: 1, ..Default::default() }
}
fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), ints: ints.to_vec(), r#type: 7, ..Default::default() }
}

fn value_info(name: &str, elem_type: i32, dims: &[Result<i64, &str>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| match d {
            Ok(v) => Dimension { dim_value: Some(*v), dim_param: None },
            Err(p) => Dimension { dim_value: None, dim_param: Some(p.to_string()) },
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto { tensor_type: Some(TypeTensor { elem_type, shape: Some(TensorShapeProto { dim }) }) }),
    }
}

impl Builder {
    fn node(&mut self, op: &str, inputs: &[&str], attributes: Vec<AttributeProto>) -> String {
        self.next += 1;
        let out = format!("{}_{}", op.to_ascii_lowercase(), self.next);
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: format!("{op}_{}", self.next),
            op_type: op.into(),
            attribute: attributes,
        });
        out
    }

    fn floats(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        self.graph.initializer.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: FLOAT,
            name: name.into(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        name.into()
    }

    fn ints(&mut self, name: &str, values: &[i64]) -> String {
        self.graph.initializer.push(TensorProto {
            dims: vec![values.len() as i64],
            data_type: INT64,
            name: name.into(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        name.into()
    }

    fn scalar_int(&mut self, name: &str, value: i64) -> String {
        self.graph.initializer.push(TensorProto { dims: vec![], data_type: INT64, name: name.into(), raw_data: value.to_le_bytes().to_vec() });
        name.into()
    }

    fn scalar_float(&mut self, name: &str, value: f32) -> String {
        self.graph.initializer.push(TensorProto { dims: vec![], data_type: FLOAT, name: name.into(), raw_data: value.to_le_bytes().to_vec() });
        name.into()
    }

    /// A weight as an initializer; `transpose` stores W^T so that the graph computes x·W^T
    /// with one MatMul.
    fn weight(&mut self, name: &str, t: &Tensor, transpose: bool) -> Result<String, ModelError> {
        let t = if transpose { t.t()?.contiguous()? } else { t.contiguous()? };
        let dims = t.dims().to_vec();
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        Ok(self.floats(name, &dims, &values))
    }

    /// x·W^T + b with a Hugging Face linear layer's `weight` and `bias`.
    fn linear(&mut self, x: &str, prefix: &str, w: &dyn Fn(&str) -> Tensor) -> Result<String, ModelError> {
        let wt = self.weight(&format!("{prefix}.weight"), &w(&format!("{prefix}.weight")), true)?;
        let b = self.weight(&format!("{prefix}.bias"), &w(&format!("{prefix}.bias")), false)?;
        let y = self.node("MatMul", &[x, &wt], vec![]);
        Ok(self.node("Add", &[&y, &b], vec![]))
    }

    fn layer_norm(&mut self, x: &str, prefix: &str, eps: f64, w: &dyn Fn(&str) -> Tensor) -> Result<String, ModelError> {
        let g = self.weight(&format!("{prefix}.weight"), &w(&format!("{prefix}.weight")), false)?;
        let b = self.weight(&format!("{prefix}.bias"), &w(&format!("{prefix}.bias")), false)?;
        Ok(self.node("LayerNormalization", &[x, &g, &b], vec![attr_int("axis", -1), attr_float("epsilon", eps as f32)]))
    }
}

/// The serialised ONNX model of a cross-encoder with `config`, weights by
/// `BertForSequenceClassification` name.
pub fn cross_encoder(config: &BertConfig, w: &dyn Fn(&str) -> Tensor) -> Result<Vec<u8>, ModelError> {
    let mut g = Builder::with_inputs("lorag_cross_encoder");
    g.graph.output.push(value_info("logits", FLOAT, &[Err("batch"), Ok(1)]));
    let x = g.encoder(config, w)?;
    let first = g.scalar_int("const_first", 0);
    let cls = g.node("Gather", &[&x, &first], vec![attr_int("axis", 1)]);
    let pooled = g.linear(&cls, "bert.pooler.dense", w)?;
    let pooled = g.node("Tanh", &[&pooled], vec![]);
    let logits = g.linear(&pooled, "classifier", w)?;
    Ok(g.finish(&logits, "logits", vec![]))
}

/// The serialised ONNX model of the encoder alone (a feature-extraction export: the hidden
/// state of every token; the embedder pools them), weights by `BertForSequenceClassification`
/// name; `source_sha256` (of the weights it was made from) is recorded in the metadata.
pub fn feature_extractor(config: &BertConfig, w: &dyn Fn(&str) -> Tensor, source_sha256: &str) -> Result<Vec<u8>, ModelError> {
    let mut g = Builder::with_inputs("lorag_feature_extractor");
    g.graph.output.push(value_info("last_hidden_state", FLOAT, &[Err("batch"), Err("sequence"), Ok(config.hidden_size as i64)]));
    let x = g.encoder(config, w)?;
    let metadata = vec![StringStringEntryProto { key: SOURCE_SHA256.into(), value: source_sha256.into() }];
    Ok(g.finish(&x, "last_hidden_state", metadata))
}

impl Builder {
    /// A graph with BERT's three int64 inputs of shape [batch, sequence].
    fn with_inputs(name: &str) -> Builder {
        let mut g = Builder { graph: GraphProto { name: name.into(), ..Default::default() }, next: 0 };
        let batch_seq = [Err("batch"), Err("sequence")];
        for input in ["input_ids", "attention_mask", "token_type_ids"] {
            g.graph.input.push(value_info(input, INT64, &batch_seq));
        }
        g
    }

    /// The serialised model, with `value` as the graph output `output`.
    fn finish(mut self, value: &str, output: &str, metadata_props: Vec<StringStringEntryProto>) -> Vec<u8> {
        self.graph.node.push(NodeProto {
            input: vec![value.into()],
            output: vec![output.into()],
            name: format!("Identity_{output}"),
            op_type: "Identity".into(),
            attribute: vec![],
        });
        let model = ModelProto {
            ir_version: 8,
            producer_name: "lorag".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(self.graph),
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
            metadata_props,
        };
        model.encode_to_vec()
    }

    /// BERT's embeddings and encoder layers; returns the last hidden state.
    fn encoder(&mut self, config: &BertConfig, w: &dyn Fn(&str) -> Tensor) -> Result<String, ModelError> {
        let (h, heads) = (config.hidden_size as i64, config.num_attention_heads as i64);
        let d = h / heads;
        let eps = config.layer_norm_eps;
        let g = self;
        // embeddings: word + position (0..sequence) + token type, then LayerNorm
        let word_t = g.weight("bert.embeddings.word_embeddings.weight", &w("bert.embeddings.word_embeddings.weight"), false)?;
        let pos_t = g.weight("bert.embeddings.position_embeddings.weight", &w("bert.embeddings.position_embeddings.weight"), false)?;
        let type_t = g.weight("bert.embeddings.token_type_embeddings.weight", &w("bert.embeddings.token_type_embeddings.weight"), false)?;
        let word = g.node("Gather", &[&word_t, "input_ids"], vec![attr_int("axis", 0)]);
        let shape = g.node("Shape", &["input_ids"], vec![]);
        let one = g.scalar_int("const_one", 1);
        let zero = g.scalar_int("const_zero", 0);
        let seq = g.node("Gather", &[&shape, &one], vec![attr_int("axis", 0)]);
        let positions = g.node("Range", &[&zero, &seq, &one], vec![]);
        let pos = g.node("Gather", &[&pos_t, &positions], vec![attr_int("axis", 0)]);
        let typ = g.node("Gather", &[&type_t, "token_type_ids"], vec![attr_int("axis", 0)]);
        let sum = g.node("Add", &[&word, &pos], vec![]);
        let sum = g.node("Add", &[&sum, &typ], vec![]);
        let mut x = g.layer_norm(&sum, "bert.embeddings.LayerNorm", eps, w)?;

        // attention bias: (mask − 1) · 10000, as [batch, 1, 1, sequence]
        let maskf = g.node("Cast", &["attention_mask"], vec![attr_int("to", FLOAT as i64)]);
        let onef = g.scalar_float("const_one_f", 1.0);
        let big = g.scalar_float("const_mask_scale", 10000.0);
        let m = g.node("Sub", &[&maskf, &onef], vec![]);
        let m = g.node("Mul", &[&m, &big], vec![]);
        let axes = g.ints("const_axes_1_2", &[1, 2]);
        let bias = g.node("Unsqueeze", &[&m, &axes], vec![]);
        let split_shape = g.ints("const_split_heads", &[0, 0, heads, d]);
        let merge_shape = g.ints("const_merge_heads", &[0, 0, h]);
        let scale = g.scalar_float("const_attention_scale", 1.0 / (d as f32).sqrt());
        let sqrt_half = g.scalar_float("const_sqrt_half", std::f32::consts::FRAC_1_SQRT_2);
        let half = g.scalar_float("const_half", 0.5);

        for l in 0..config.num_hidden_layers {
            let p = |k: usize| {
                let name = LAYER_WEIGHTS[k];
                format!("bert.encoder.layer.{l}.{}", &name[..name.rfind('.').expect("a dotted name")])
            };
            let heads_of = |g: &mut Builder, k: usize, perm: &[i64]| -> Result<String, ModelError> {
                let y = g.linear(&x, &p(k), w)?;
                let y = g.node("Reshape", &[&y, &split_shape], vec![]);
                Ok(g.node("Transpose", &[&y], vec![attr_ints("perm", perm)]))
            };
            let q = heads_of(g, 0, &[0, 2, 1, 3])?;
            let k = heads_of(g, 2, &[0, 2, 3, 1])?;
            let v = heads_of(g, 4, &[0, 2, 1, 3])?;
            let scores = g.node("MatMul", &[&q, &k], vec![]);
            let scores = g.node("Mul", &[&scores, &scale], vec![]);
            let scores = g.node("Add", &[&scores, &bias], vec![]);
            let probs = g.node("Softmax", &[&scores], vec![attr_int("axis", -1)]);
            let ctx = g.node("MatMul", &[&probs, &v], vec![]);
            let ctx = g.node("Transpose", &[&ctx], vec![attr_ints("perm", &[0, 2, 1, 3])]);
            let ctx = g.node("Reshape", &[&ctx, &merge_shape], vec![]);
            let a = g.linear(&ctx, &p(6), w)?;
            let a = g.node("Add", &[&a, &x], vec![]);
            x = g.layer_norm(&a, &p(8), eps, w)?;
            // GELU(x) = x · 0.5 · (1 + erf(x / √2))
            let f = g.linear(&x, &p(10), w)?;
            let e = g.node("Mul", &[&f, &sqrt_half], vec![]);
            let e = g.node("Erf", &[&e], vec![]);
            let e = g.node("Add", &[&e, &onef], vec![]);
            let e = g.node("Mul", &[&e, &half], vec![]);
            let f = g.node("Mul", &[&f, &e], vec![]);
            let f = g.linear(&f, &p(12), w)?;
            let f = g.node("Add", &[&f, &x], vec![]);
            x = g.layer_norm(&f, &p(14), eps, w)?;
        }
        Ok(x)
    }
}
