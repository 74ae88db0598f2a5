"""The prompts of paper §3.1 (after FineR's How-to, Identify and Reason prompts)."""

GENERAL_KEY = "General description of the image"

DISCOVER = (
    "Your task is to tell me what are the useful attributes for distinguishing {super_category} {class_unit} "
    "in a photo of a {super_category}.\n"
    "For example, the useful attributes for distinguishing butterfly species in a photo of a butterfly are: "
    "['wing color', 'wing pattern', 'wing shape', 'body size', 'antenna shape'].\n"
    "Answer with a Python list of attribute names only."
)

EXTRACT = "Questions: What is the {attribute} of the {super_category} in this image? Answer:"
EXTRACT_GENERAL = "Questions: Describe this image in details. Answer:"

# tag-based construction (Table 6e): class-level values from the category name, without an image
EXTRACT_TAG = "Questions: What is the {attribute} of the {super_category} {category}? Answer:"
EXTRACT_TAG_GENERAL = "Questions: Describe the {super_category} {category} in details. Answer:"

SUMMARIZE = (
    "General description: {general}\n"
    "Attribute description:\n{attributes}\n"
    "Summarize the information you get about the {super_category} from the general description and "
    "attribute description with {sentences}."
)
SENTENCES = {"long": "five sentences", "short": "one sentence"}
