"""General English text for ``evaluation.general: builtin``: what fine-tuning on a task may cost a
model on ordinary text it was not fine-tuned on (catastrophic forgetting).

Written for peftkit (no licence questions, nothing downloaded), in the register of an encyclopedia
or a textbook, across unrelated topics, so that no single task's data resembles it much. Its
perplexity means nothing alone: compare the value before and after training.
"""

PARAGRAPHS = (
    "Bread is one of the oldest prepared foods. A simple dough of flour and water, left to stand, "
    "collects wild yeasts and bacteria from the air; they feed on the sugars in the flour and release "
    "carbon dioxide, which is trapped by the gluten network and makes the dough rise. Baking sets the "
    "structure, and the browning of the crust comes from reactions between sugars and proteins.",
    "The water cycle moves water between the oceans, the air and the land. Heat from the sun "
    "evaporates water from the sea surface; the vapour rises, cools and condenses into clouds. When the "
    "droplets grow heavy enough they fall as rain or snow, and rivers and groundwater carry much of it "
    "back to the sea over days, years or, for deep aquifers, many thousands of years.",
    "A library lends books, but it also keeps them. Most public libraries catalogue their collections "
    "so that a reader can find a title by author, subject or keyword, and many now lend electronic "
    "books and audio recordings as well. Librarians help people find reliable information, which has "
    "become a larger part of the job as the amount of published material has grown.",
    "Volcanoes form where molten rock reaches the surface of the Earth. Many lie along the edges of "
    "tectonic plates, where one plate sinks beneath another or where two plates pull apart; others sit "
    "above hot spots deep in the mantle, such as the one that built the Hawaiian islands. An eruption "
    "can pour out slow rivers of lava or throw ash high into the atmosphere.",
    "Learning a musical instrument trains more than the fingers. A beginner practises scales to build "
    "speed and accuracy, learns to read rhythm and pitch from written notes, and slowly develops the "
    "ability to hear when a note is out of tune. Teachers often recommend short daily practice rather "
    "than long sessions once a week, because skills consolidate between sessions.",
    "The heart is a muscular pump with four chambers. The right side receives blood that has returned "
    "from the body and sends it to the lungs, where it releases carbon dioxide and takes up oxygen. The "
    "left side receives this oxygen-rich blood and pushes it out through the arteries. Valves between "
    "the chambers keep the blood flowing in one direction.",
    "Trains changed how far people could travel in a day. Before railways, a journey between two "
    "cities might take a week by coach; afterwards it could take a few hours, and towns along the lines "
    "grew quickly. Standard time zones were introduced in part because railway timetables needed every "
    "station to agree on the time.",
    "Honeybees live in colonies that can number tens of thousands of insects. A single queen lays the "
    "eggs, while worker bees build the wax comb, care for the young, guard the entrance and gather "
    "nectar and pollen. A worker that finds a good source of food returns to the hive and performs a "
    "dance whose direction and length tell the others where to fly.",
    "A budget is a plan for money. It lists expected income and expected spending over a period, "
    "usually a month, and shows whether anything is left to save. People who keep a budget often find "
    "that small regular expenses add up to more than they thought, and that setting money aside at the "
    "start of the month is easier than saving whatever remains at the end.",
    "Glass is made by melting sand, soda and lime at a high temperature and letting the liquid cool "
    "without forming crystals. Because its atoms are arranged irregularly, light passes through it with "
    "little scattering. Glassmakers have long added small amounts of metals to colour it: cobalt gives "
    "a deep blue, and traces of gold can produce a rich red.",
    "Maps simplify the world so that it can be read at a glance. A road map leaves out most buildings "
    "but shows every junction; a geological map colours the ground by the age and type of its rock. "
    "Every flat map of the round Earth distorts something, whether areas, shapes or distances, and "
    "mapmakers choose a projection to suit the purpose of the map.",
    "Sleep is not simply rest. During the night the brain passes through several stages, from light "
    "sleep to deep, slow-wave sleep and the rapid-eye-movement sleep in which most vivid dreams occur. "
    "Studies suggest that sleep helps to store memories and to clear waste products from the brain, and "
    "adults who sleep too little for long periods face higher risks of several illnesses.",
    "The printing press with movable type made books far cheaper to produce. Before it, texts were "
    "copied by hand, and a single book could take months to finish. Within a few decades of its spread "
    "in Europe, millions of printed volumes were in circulation, and ideas could travel faster and "
    "further than ever before.",
    "Rainforests grow in warm regions where rain falls through most of the year. They hold a large "
    "share of the world's plant and animal species, many of which live high in the canopy and never "
    "touch the ground. The soil beneath them is often thin, because nutrients are taken up by the "
    "vegetation almost as soon as fallen leaves decay.",
    "A bicycle is a remarkably efficient machine. A rider on a flat road can travel several times "
    "faster than a walker for the same effort, because the wheels roll with little friction and the "
    "gears let the legs turn at a comfortable pace. Keeping the tyres properly inflated and the chain "
    "clean makes a noticeable difference to how easily it runs.",
    "Chess is played on a board of sixty-four squares by two players, each with sixteen pieces. The "
    "aim is to trap the opposing king so that it cannot escape capture, which is called checkmate. "
    "Although the rules fit on a single page, the number of possible games is so large that no one "
    "will ever play them all, and players study openings, tactics and endgames for years.",
    "Tides are caused mainly by the pull of the Moon on the oceans, with a smaller contribution from "
    "the Sun. Most coasts see two high tides and two low tides each day. When the Sun and Moon line up, "
    "at new and full moon, the tides are larger than usual; when they pull at right angles, the "
    "difference between high and low water is smaller.",
    "Composting turns kitchen scraps and garden waste into a dark, crumbly material that improves "
    "soil. Microorganisms break the material down, and they work best with a mixture of green waste, "
    "rich in nitrogen, and brown waste such as dry leaves or cardboard, rich in carbon. Turning the "
    "heap now and then lets in air and speeds the process up.",
    "Vaccines train the immune system to recognise a germ before a real infection. They contain a "
    "harmless piece or a weakened form of the germ, or instructions for the body to make one of its "
    "proteins. The immune system responds and keeps a memory of the encounter, so that a later "
    "infection can be fought off quickly.",
    "Bridges carry roads and railways across rivers and valleys. A beam bridge rests on supports at "
    "each end; an arch bridge pushes its load outward into the ground at its feet; a suspension bridge "
    "hangs its deck from cables slung between tall towers. Engineers choose a design according to the "
    "distance to be spanned, the ground and the loads the bridge must carry.",
    "Writing a clear letter takes planning. The writer decides first what the reader needs to know "
    "and what should happen next, then puts the most important point near the beginning. Short "
    "paragraphs, plain words and a polite but direct tone usually work better than long sentences full "
    "of qualifications.",
    "The Moon has no air and almost no water, so its surface keeps the marks of impacts for billions "
    "of years. The dark areas visible from Earth are plains of ancient lava, and the bright regions are "
    "older highlands covered in craters. Because the Moon turns once for each orbit, the same side "
    "always faces the Earth.",
    "Cooperatives are businesses owned by the people who use them. A farmers' cooperative may buy "
    "seed in bulk and sell its members' harvests together, obtaining better prices than each farmer "
    "could alone. Members usually have one vote each, whatever the size of their share, and profits "
    "are returned to them or reinvested.",
    "Snow forms when water vapour freezes directly into ice crystals high in a cloud. Each crystal "
    "grows six arms because of the way water molecules fit together, and the exact shape depends on "
    "the temperature and humidity the crystal meets as it falls. Fresh snow is mostly air, which is why "
    "it muffles sound and insulates the ground beneath it.",
)

TEXT = "\n\n".join(PARAGRAPHS)
