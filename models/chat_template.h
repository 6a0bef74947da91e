// Chat templates: a conversation (role, content messages) as the prompt text an instruct model was
// trained on. Hugging Face ships the format as Jinja source (tokenizer_config.json's
// "chat_template", or chat_template.jinja); ferry does not run Jinja: it recognises the source's
// family by its markers and renders that family's format in C++, as llama.cpp did before it ran
// templates. Each family's rendering is tested against transformers' own rendering of the real
// template (tests/data/chat). A template of another family, or one with parts ferry would leave
// out (Llama-3.1's dated system header), is refused with a message naming --chat-template.
//
// The rendered text holds the special tokens as text (BOS too, where the template writes it): it is
// encoded without adding special tokens, as apply_chat_template(tokenize=True) does.
#pragma once

#include <span>
#include <string>
#include <vector>

#include "runtime/status.h"

namespace ferry {

class Tokenizer;

struct ChatMessage {
  std::string role;     // system, user or assistant
  std::string content;
};

enum class ChatFormat {
  kChatML,   // <|im_start|>role\n...<|im_end|>\n, with the template's default system message if it has one
  kQwen2,    // Qwen2 base's ChatML: a system message always, the assistant header after every user turn
  kLlama3,   // <|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|> (Llama-3 Instruct)
  kLlama2,   // <s>[INST] <<SYS>>\n...\n<</SYS>>\n\n... [/INST] ... </s> (Llama-2-chat)
  kMistral,  // <s>[INST] ... [/INST]...</s> (Mistral-7B-Instruct v0.1; no system role)
  kZephyr,   // <|user|>\n...</s>\n<|assistant|>\n (Zephyr, TinyLlama-Chat)
};

// Returns the names --chat-template takes, comma-separated.
std::string chat_format_names();
const char* chat_format_name(ChatFormat f);
Expected<ChatFormat> chat_format_from_name(const std::string& name);

struct ChatTemplate {
  ChatFormat format = ChatFormat::kChatML;
  std::string bos_token, eos_token;  // as text (tokenizer_config.json's bos_token / eos_token)
  std::string default_system;        // kChatML / kQwen2: the system message used when none is given

  // Recognises `source` (a Hugging Face Jinja chat template). `where` names it in messages.
  static Expected<ChatTemplate> detect(const std::string& source, const std::string& bos, const std::string& eos, const std::string& where);
  // Reads the chat template of a Hugging Face model directory: chat_template.jinja, else
  // tokenizer_config.json's "chat_template" (a string, or a list of named ones: "default"). With
  // `format_name` (--chat-template) that format is used, and the directory's only gives the BOS /
  // EOS text and a default system message. Fails, naming the file and --chat-template, when there
  // is none or ferry does not render it.
  static Expected<ChatTemplate> from_model_dir(const std::string& dir, const std::string& format_name = "");

  // Returns the prompt for `messages`, ending with the assistant's header when
  // `add_generation_prompt`. Refuses what the format cannot say (roles that must alternate, a
  // system message where the format has none, roles other than system / user / assistant), naming
  // the message.
  Expected<std::string> render(std::span<const ChatMessage> messages, bool add_generation_prompt) const;
  // Returns the text of the tokens that end an assistant turn (<|im_end|>, <|eot_id|>, EOS).
  std::vector<std::string> end_of_turn() const;
  // Returns their ids in `tok` (a text that is not one token there is left out).
  std::vector<int32_t> end_of_turn_ids(const Tokenizer& tok) const;
};

}  // namespace ferry
